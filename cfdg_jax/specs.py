"""Settings written as one string, "name(field=value,...)", as in results rows and CLI flags.

`format_spec` writes the canonical form (fields sorted, values as Python literals), which
`parse_spec` reads back; parse_spec also takes a bare name, a bare "field=value,..." list, and
unquoted strings (grid=uniform).
"""
import ast
import re
from typing import Any

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)?\s*(?:\((.*)\))?\s*$", re.DOTALL)


def format_spec(name: str, fields: dict[str, Any]) -> str:
  """name(k1=v1,k2=v2) with the keys sorted; just name when there are no fields."""
  if not fields:
    return name
  return f"{name}({','.join(f'{k}={v!r}' for k, v in sorted(fields.items()))})"


def _split(body: str) -> list[str]:
  """Splits on commas outside brackets and quotes."""
  parts, depth, quote, start = [], 0, None, 0
  for i, ch in enumerate(body):
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(body[start:i])
      start = i + 1
  parts.append(body[start:])
  return [p.strip() for p in parts if p.strip()]


def _value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if text.lower() in ("true", "false"):
      return text.lower() == "true"
    return text  # An unquoted string.


def parse_spec(spec: str, default_name: str | None = None) -> tuple[str, dict[str, Any]]:
  """"ddim(num_steps=50,eta=0.5)" -> ("ddim", {"num_steps": 50, "eta": 0.5}).

  "k=v,..." alone takes `default_name`. Raises ValueError on malformed input, quoting it.
  """
  text = spec.strip()
  if default_name is not None and "=" in text and not re.match(r"^\s*\w+\s*\(", text):
    text = f"{default_name}({text})"
  match = _SPEC.match(text)
  if not match or not (match.group(1) or default_name):
    raise ValueError(f"Cannot read the spec {spec!r}: write name or name(field=value,...), "
                     "e.g. ddim(num_steps=50,eta=0.5).")
  name = match.group(1) or default_name
  fields = {}
  for part in _split(match.group(2) or ""):
    key, sep, value = part.partition("=")
    if not sep or not key.strip().isidentifier():
      raise ValueError(f"Cannot read {part!r} in the spec {spec!r}: fields are field=value.")
    fields[key.strip()] = _value(value.strip())
  return name, fields
