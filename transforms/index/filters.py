"""Filters on class fractions, as `search --where` and the web page take them:
"building >= 0.3 and tree < 0.1". Pure functions over a (rows, classes) matrix."""
from __future__ import annotations

import operator
import re

import numpy as np

_OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt,
              "==": operator.eq, "=": operator.eq, "!=": operator.ne}
_CLAUSE = re.compile(r"^\s*(?P<name>[A-Za-z_][\w .-]*?|\"[^\"]+\")\s*"
                     r"(?P<op>>=|<=|==|!=|=|>|<)\s*(?P<value>[-+]?(\d+\.?\d*|\.\d+))\s*$")


class FilterError(ValueError):
  """A filter that cannot be read; the message says what to fix."""


def _key(name: str) -> str:
  return re.sub(r"[\s_-]+", "_", name.strip().strip('"').lower())


def parse_where(text: str, class_names) -> tuple:
  """((class index, operator symbol, value), ...) from 'name OP number [and ...]'. Names
  match class names ignoring case, and spaces, '-' and '_' alike."""
  if not text or not text.strip():
    return ()
  by_key = {_key(name): i for i, name in enumerate(class_names)}
  clauses = []
  for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
    match = _CLAUSE.match(part)
    if not match:
      raise FilterError(f"--where {text!r}: cannot read {part!r}; write clauses like "
                        "'building >= 0.3' joined by 'and'")
    name = match.group("name")
    if _key(name) not in by_key:
      raise FilterError(f"--where: no class {name.strip()!r}; classes: "
                        f"{', '.join(class_names)}")
    value = float(match.group("value"))
    if not 0 <= value <= 1:
      raise FilterError(f"--where {part.strip()!r}: class fractions lie in [0, 1]")
    clauses.append((by_key[_key(name)], match.group("op"), value))
  return tuple(clauses)


def evaluate(clauses: tuple, fractions: np.ndarray) -> np.ndarray:
  """(rows,) bool: rows whose fractions pass every clause; NaN fractions (no mask) never
  pass a clause."""
  keep = np.ones(len(fractions), bool)
  for column, symbol, value in clauses:
    values = fractions[:, column]
    keep &= np.isfinite(values) & _OPERATORS[symbol](values, np.float32(value))
  return keep


def fraction_matrix(table, class_names) -> np.ndarray:
  """(rows, classes) float32 of a Table's class_fractions column, by class name; NaN
  where a row has none (no mask) or the column is missing."""
  rows = table.num_rows
  if "class_fractions" not in table.column_names:
    return np.full((rows, len(class_names)), np.nan, np.float32)
  struct = table.column("class_fractions").combine_chunks()
  missing = np.asarray(struct.is_null()) if struct.null_count else None
  columns = []
  for name in class_names:
    values = struct.field(name).to_numpy(zero_copy_only=False).astype(np.float32)
    if missing is not None:
      values[missing] = np.nan
    columns.append(values)
  return np.stack(columns, axis=1) if columns else np.zeros((rows, 0), np.float32)


def describe(clauses: tuple, class_names) -> str:
  return " and ".join(f"{class_names[c]} {op} {value:g}" for c, op, value in clauses)
