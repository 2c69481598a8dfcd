"""hrnet-beam index, search and serve on a real job output: recall against exact search,
filters inside the search, appending, and the web page in a real headless Chromium."""
import glob
import json
import os
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import hrnet_beam, run_job, save_image, textured_image
from pipeline.cli import index as index_cli
from pipeline.cli import search as search_cli
from transforms.exports.rows import row_files
from transforms.index.search import Searcher
from transforms.serving import JobOutput, make_server

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def job(tiny_model, tmp_path_factory):
  """Twelve images in two runs (the second one for --append), with patches."""
  tmp = tmp_path_factory.mktemp("search")
  for run, seeds in (("r1", range(0, 8)), ("r2", range(8, 12))):
    directory = tmp / f"in-{run}"
    directory.mkdir()
    for seed in seeds:
      save_image(directory / f"im{seed:02d}.png", textured_image(96 + 8 * seed, 128, seed))
    summary = run_job("--input", directory / "*.png", "--output", f"{tmp}/out/",
                      "--model", tiny_model, "--tile_size", 64, "--tile_overlap", 32,
                      "--patch_output", f"{tmp}/out/", "--patch_size", 32,
                      "--run_id", run)
    assert summary.errors == 0
  return tmp


def _first_run_only(job, tmp_path, level):
  """A copy of the output holding the first run's files only."""
  copy = tmp_path / "first"
  copy.mkdir()
  name = "segmentations" if level == "image" else "patches"
  for path in glob.glob(f"{job}/out/{name}-*r1-*.parquet"):
    shutil.copy(path, copy)
  return copy / name


def test_patch_index_search_with_filter_and_append(job, tmp_path):
  first = _first_run_only(job, tmp_path, "patch")
  report = index_cli.index(str(first), str(tmp_path / "index"), level="patch")
  first_count = sum(pq.read_metadata(f).num_rows for f in glob.glob(f"{first}-*.parquet"))
  assert report.vectors == first_count and report.index_type == "Flat"
  # --append adds the second run's files without rebuilding.
  for path in glob.glob(f"{job}/out/patches-*r2-*.parquet"):
    shutil.copy(path, tmp_path / "first")
  before = Searcher(str(tmp_path / "index"))
  report = index_cli.index(str(first), str(tmp_path / "index"), level="patch", append=True)
  total = sum(pq.read_metadata(f).num_rows for f in glob.glob(f"{first}-*.parquet"))
  assert report.vectors == total > first_count and report.appended_files >= 1
  assert index_cli.index(str(first), str(tmp_path / "index"), level="patch",
                         append=True) is None   # nothing new
  searcher = Searcher(str(tmp_path / "index"))
  np.testing.assert_array_equal(searcher.transform.projection,
                                before.transform.projection)   # not refitted
  # Nearest by brute force over the stored vectors, whitened and normalised likewise.
  table = pq.read_table(sorted(glob.glob(f"{first}-*.parquet")))
  vectors = np.asarray(table.column("embedding").to_pylist(), np.float32)
  keys = list(zip(table.column("image_id").to_pylist(), table.column("patch_row").to_pylist(),
                  table.column("patch_col").to_pylist()))
  transform = searcher.transform
  assert transform.normalization == "whitened" and transform.output_dim < vectors.shape[1]
  centred = (vectors - transform.mean) @ transform.projection / transform.scale
  centred /= np.linalg.norm(centred, axis=1, keepdims=True)
  query = keys[7]
  row = searcher.row_of(query[0], query[1:])
  hits = searcher.search(searcher.stored_vector(row), k=5, exclude=row)
  scores = centred @ centred[keys.index(query)]
  order = [keys[i] for i in np.argsort(-scores) if keys[i] != query][:5]
  assert [(h.image_id, *h.patch) for h in hits] == order
  np.testing.assert_allclose([h.score for h in hits], sorted(scores, reverse=True)[1:6],
                             rtol=1e-4)
  # A selective filter still returns k results when k rows match.
  names = searcher.class_names
  fractions = table.column("class_fractions").to_pylist()
  name = max(names, key=lambda n: np.median([f[n] for f in fractions]))
  threshold = float(np.quantile([f[name] for f in fractions], 0.8))
  matching = [k for k, f in zip(keys, fractions) if f[name] >= np.float32(threshold)
              and k != query]
  hits = searcher.search(searcher.stored_vector(row), k=10, where=f"{name} >= {threshold}",
                         exclude=row)
  assert len(hits) == min(10, len(matching)) >= 5
  assert all(h.class_fractions[name] >= np.float32(threshold) for h in hits)


def test_search_command_embeds_a_query_image_like_the_job(job, tmp_path, tiny_model):
  report = index_cli.index(f"{job}/out/", str(tmp_path / "index"))
  assert report.vectors == 12
  # The query is one of the indexed images: embedded again by the job, it finds itself.
  source = job / "in-r1" / "im03.png"
  result = subprocess.run(hrnet_beam("search", tmp_path / "index", "--image", source, "--k",
                                     3, "--json"), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  hits = [json.loads(line) for line in result.stdout.splitlines()]
  assert len(hits) == 3 and hits[0]["image_id"] == str(source)
  assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
  searcher = Searcher(str(tmp_path / "index"))
  stored = searcher.stored_vector(searcher.row_of(str(source)))
  np.testing.assert_allclose(search_cli.embed_image(str(source), searcher.manifest), stored,
                             rtol=1e-6)
  bad = subprocess.run(hrnet_beam("search", tmp_path / "index", "--id", str(source),
                                  "--where", "nosuchclass > 0.2"), capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and "no class 'nosuchclass'" in bad.stderr


@pytest.fixture()
def server(job, tmp_path):
  index_cli.index(f"{job}/out/", str(tmp_path / "patch-index"), level="patch")
  index_cli.index(f"{job}/out/", str(tmp_path / "image-index"))
  servers = {}
  for level in ("image", "patch"):
    output = JobOutput(row_files(f"{job}/out/"),
                       Searcher(str(tmp_path / f"{level}-index")))
    httpd = make_server(output, "127.0.0.1", 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    servers[level] = (f"http://127.0.0.1:{httpd.server_address[1]}", output)
  yield servers
  for url, _ in servers.values():
    del url


def _get(url):
  try:
    with urllib.request.urlopen(url, timeout=30) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.read()


def test_server_serves_only_the_jobs_own_files(server):
  base, output = server["image"]
  status, body = _get(f"{base}/api/info")
  assert status == 200 and json.loads(body)["images"] == 12
  status, body = _get(f"{base}/media/image/0?size=64")
  assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
  for path in ("/media/image/../../../../etc/passwd", "/etc/passwd", "/media/image/12",
               "/media/image/-1", "/media/mask/99999999", "/static/../app.py",
               "/media/image/0?source=/etc/passwd&path=/etc/passwd"):
    status, body = _get(base + path.replace("?source=/etc/passwd&path=/etc/passwd", ""))
    assert status in (200, 404), path
    assert b"root:" not in body
  status, body = _get(base + "/media/image/0?path=/etc/passwd")
  assert status == 200 and b"root:" not in body   # query words never name files
  status, body = _get(base + "/api/images?where=" + urllib.request.quote("nope >= 0.1"))
  assert status == 400 and b"no class" in body
  total = json.loads(_get(base + "/api/images")[1])["total"]
  page = json.loads(_get(base + "/api/images?offset=10&limit=5")[1])
  assert page["total"] == total == 12 and [i["row"] for i in page["images"]] == [10, 11]
  name = output.class_names[int(np.nanargmax(np.nanmean(output._fractions, axis=0)))]  # pylint: disable=protected-access
  some = json.loads(_get(base + "/api/images?where=" + urllib.request.quote(
      f"{name} >= 0.5"))[1])
  assert some["total"] == sum(1 for f in output.rows.column("class_fractions").to_pylist()
                              if f[name] >= np.float32(0.5)) <= total


def _chromium(tmp_path):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if os.environ.get("HRNET_BEAM_REQUIRE_BROWSER"):
      pytest.fail("Chromium is required (make test installs Debian's chromium and "
                  "chromium-driver)")
    pytest.skip("Debian's chromium and chromium-driver are not installed")
  os.environ.setdefault("SE_OFFLINE", "true")   # Selenium Manager must not download
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--window-size=1400,1000",
               f"--user-data-dir={tmp_path / 'chromium-profile'}"):
    options.add_argument(flag)
  return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_page_in_headless_chromium_shows_neighbours_on_click(server, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  driver = _chromium(tmp_path)
  try:
    for level in ("image", "patch"):
      base, output = server[level]
      driver.get(base + "/")
      wait = WebDriverWait(driver, 30)
      wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == 12)
      # Pictures really load (their natural size is known once decoded).
      wait.until(lambda d: d.execute_script(
          "return [...document.querySelectorAll('.pic img')].every(i => i.complete && "
          "i.naturalWidth > 0)"))
      card = driver.find_elements(By.CSS_SELECTOR, ".card")[2]
      card.click()
      searcher = output.searcher
      if level == "patch":
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".cell"))
        cell = driver.find_elements(By.CSS_SELECTOR, ".cell")[1]
        query = int(cell.get_attribute("data-index-id"))
        cell.click()
      else:
        query = int(card.get_attribute("data-index-id"))
      wait.until(lambda d: d.find_element(By.ID, "hits").get_attribute("data-query") ==
                 str(query))
      shown = [int(h.get_attribute("data-index-id"))
               for h in driver.find_elements(By.CSS_SELECTOR, ".hit")]
      expected = [h.id for h in searcher.search(searcher.stored_vector(query), 12,
                                                exclude=query)]
      assert shown == expected and len(shown) == min(12, searcher.index.ntotal - 1)
      wait.until(lambda d: d.execute_script(
          "return [...document.querySelectorAll('.hit img')].every(i => i.complete && "
          "i.naturalWidth > 0)"))
      # A filter narrows the grid.
      names = output.class_names
      name = names[int(np.nanargmax(np.nanmean(output._fractions, axis=0)))]  # pylint: disable=protected-access
      box = driver.find_element(By.ID, "where")
      box.clear()
      box.send_keys(f"{name} >= 0.5\n")
      expected_total = json.loads(_get(base + "/api/images?where=" + urllib.request.quote(
          f"{name} >= 0.5"))[1])["total"]
      wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".card")) == expected_total)
      driver.save_screenshot(str(tmp_path / f"page-{level}.png"))
      assert os.path.getsize(tmp_path / f"page-{level}.png") > 10_000
  finally:
    driver.quit()
