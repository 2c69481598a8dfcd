"""The local web page over a job's output and index (app: JSON endpoints and pictures)."""
from transforms.serving.app import JobOutput, make_server

__all__ = ["JobOutput", "make_server"]
