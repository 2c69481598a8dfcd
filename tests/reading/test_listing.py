"""The streamed listing names exactly what FileSystems.match names (ids of earlier runs depend
on it), locally and on gs://, and holds bounded memory while it walks."""
import os
import subprocess
import sys
import textwrap

import pytest
from apache_beam.io.filesystems import FileSystems

from transforms.reading.listing import first_match, matching_files

from inputs import upload

PATTERNS = ["{root}/images/*", "{root}/images/*.png", "{root}/images/", "{root}/images/**",
            "{root}/images/**.png", "{root}/images/*/*.png", "{root}/images/s?b/*",
            "{root}/images/[ab].png", "{root}/images/a.png", "{root}/images/missing.png",
            "{root}/images/sub/deeper/*", "{root}/image*/a.png", "{root}/nothing/*",
            "{root}/images/*.PNG"]


def _beam(pattern):
  return sorted((m.path, m.size_in_bytes) for m in FileSystems.match([pattern])[0].metadata_list)


def _ours(pattern):
  return sorted((m.path, m.size_in_bytes) for m in matching_files(pattern))


def _tree(root):
  files = ["images/a.png", "images/b.png", "images/c.jpg", "images/sub/d.png",
           "images/sub/deeper/e.png", "images/sib/f.png", "images2/a.png"]
  for i, name in enumerate(files):
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
      f.write(b"x" * (i + 1))
  return files


@pytest.mark.parametrize("relative", [False, True])
def test_local_listing_names_what_beam_names(tmp_path, monkeypatch, relative):
  _tree(tmp_path)
  root = str(tmp_path)
  if relative:   # ids are the paths as given: a relative pattern gives relative ids
    monkeypatch.chdir(tmp_path)
    root = "."
  for template in PATTERNS:
    pattern = template.format(root=root)
    assert _ours(pattern) == _beam(pattern), pattern
  assert first_match(f"{root}/images/*.png").path.endswith(".png")
  assert first_match(f"{root}/nothing/*") is None


def test_gcs_listing_names_what_beam_names(bucket):
  for i, name in enumerate(["images/a.png", "images/b.png", "images/c.jpg", "images/sub/d.png",
                            "images2/a.png", "other/x.png"]):
    upload(f"{bucket}/{name}", b"x" * (i + 1))
  for pattern in (f"{bucket}/images/*", f"{bucket}/images/*.png", f"{bucket}/images/**",
                  f"{bucket}/image*", f"{bucket}/images/a.png", f"{bucket}/images/zz.png",
                  f"{bucket}/nothing/*", f"{bucket}/images/"):
    assert _ours(pattern) == _beam(pattern), pattern
  assert first_match(f"{bucket}/images/*.jpg").path == f"{bucket}/images/c.jpg"


def test_gcs_listing_follows_pages_as_beam_does(tmp_path):
  """2,345 objects on a server that pages as GCS does (1,000 a page): the streamed listing
  follows every page and names what Beam names; the check stops at the first object. In a
  child process, so the session's emulator and its cached clients stay as they are."""
  script = textwrap.dedent(f"""
      import os, sys
      sys.path.insert(0, 'tests')
      import gcs
      server = gcs.PagingEmulator({str(tmp_path / 'root')!r})
      try:
        os.environ.update(gcs.client_environment(server.endpoint, {str(tmp_path / 'c.json')!r}))
        server.create_bucket('paged')
        server.seed('paged', [f'images/{{i:05d}}.png' for i in range(2345)]
                    + ['images/sub/x.png', 'other/y.png'])
        from apache_beam.io.filesystems import FileSystems
        from transforms.reading.listing import first_match, matching_files
        for pattern in ('gs://paged/images/*', 'gs://paged/images/**', 'gs://paged/*'):
          ours = sorted(m.path for m in matching_files(pattern))
          beam = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
          assert ours == beam, (pattern, len(ours), len(beam))
          print(pattern, len(ours))
        print('first', first_match('gs://paged/images/*').path)
      finally:
        server.stop()
  """)
  out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))).stdout.splitlines()
  assert out == ["gs://paged/images/* 2345", "gs://paged/images/** 2346", "gs://paged/* 0",
                 "first gs://paged/images/00000.png"], out


def test_listing_a_large_directory_holds_one_entry_at_a_time(tmp_path):
  """200,000 names in one directory: counting them through matching_files adds a few MB of
  peak memory, where FileSystems.match's list of every FileMetadata adds tens (child
  processes, VmHWM)."""
  directory = tmp_path / "many"
  directory.mkdir()
  for i in range(200_000):   # empty files: ext4 allows 65,000 hard links to one
    os.close(os.open(directory / f"tile_{i:07d}_with_a_longer_name_as_buckets_have.png",
                     os.O_CREAT | os.O_WRONLY, 0o644))
  script = textwrap.dedent(f"""
      import sys
      def peak():
        return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])
      from apache_beam.io.filesystems import FileSystems
      from transforms.reading.listing import matching_files
      before = peak()
      if sys.argv[1] == 'ours':
        n = sum(1 for _ in matching_files({str(directory)!r} + '/*.png'))
      else:
        n = len(FileSystems.match([{str(directory)!r} + '/*.png'])[0].metadata_list)
      print(n, (peak() - before) // 1024)
  """)
  grown = {}
  for way in ("ours", "beam"):
    out = subprocess.run([sys.executable, "-c", script, way], check=True, capture_output=True,
                         text=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                             os.path.abspath(__file__))))).stdout.split()
    assert int(out[0]) == 200_000
    grown[way] = int(out[1])
  assert grown["ours"] <= 8, grown
  assert grown["beam"] >= 40, grown   # the bound above means something
