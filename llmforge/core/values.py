"""The recipe's value types: counts with suffixes ("200M", "128Ki"), fractions and percentages,
numbers that refuse YAML's booleans, and the strict base of every spec."""

from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, WithJsonSchema

# Decimal suffixes for budgets ("200M" tokens), binary ones where powers of two matter
# ("128Ki" batch tokens = 131072, which divides any power-of-two seq_len).
_SUFFIX = {
    "k": 10**3, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
}
_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(Ki|Mi|Gi|k|K|M|B|G|T)?\s*$")


MAX_COUNT = 10**15  # a quadrillion tokens, steps or rows: beyond any machine, and past it plans loop


def parse_count(value):
    """'20M' -> 20_000_000, '1.5B', '100k', '128Ki' -> 131072, '1e6'; ints pass through."""
    if isinstance(value, bool):
        raise ValueError("expected a count like 1000, '100k', '20M' or '1.5B'")
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")) or not value.is_integer():
            raise ValueError(f"expected a whole number, got {value}")
        value = int(value)
    elif isinstance(value, str):
        m = _COUNT.match(value)
        if not m:
            raise ValueError(f"expected a count like 1000, '100k', '20M' or '1.5B', got {value!r}")
        number = float(m.group(1)) * _SUFFIX.get(m.group(2) or "", 1)
        if not number.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        value = int(number)
    elif not isinstance(value, int):
        raise ValueError(f"expected a count like 1000, '100k', '20M' or '1.5B', got {value!r}")
    if value > MAX_COUNT:
        raise ValueError(f"{value:.3g} is more than any machine can run (at most {MAX_COUNT:.0e})")
    return value


def parse_fraction(value):
    """'5%' -> 0.05; numbers in [0, 1) pass through. Used where only a share makes sense."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            return float(value.strip()[:-1]) / 100
        except ValueError:
            pass
        raise ValueError(f"expected a percentage like '5%', got {value!r}")
    return value


def _steps_or_percent(value):
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _PERCENT.match(value):
        return value.strip()
    raise ValueError(f"expected a step count like 100 or a share of the stage like '2%', got {value!r}")


def _number_or_percent(value):
    if isinstance(value, str) and not _PERCENT.match(value):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    if isinstance(value, str) and _PERCENT.match(value):
        return value.strip()
    raise ValueError(f"expected a number like 3e-5 or a share of the peak like '10%', got {value!r}")


def _auto_or_positive(value):
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        return value
    raise ValueError(f"expected 'auto' or a positive whole number, got {value!r}")


_PERCENT = re.compile(r"^\s*[0-9]*\.?[0-9]+\s*%\s*$")

# What editors see (docs/recipe.schema.json): the spellings users may write, not the parsed types.
_COUNT_JSON = {"anyOf": [{"type": "integer", "minimum": 0},
                         {"type": "string", "pattern": r"^[0-9.eE+-]+\s*(Ki|Mi|Gi|k|K|M|B|G|T)?$"}]}
_PERCENT_JSON = {"type": "string", "pattern": r"^[0-9.]+\s*%$"}

Count = Annotated[int, BeforeValidator(parse_count), Field(ge=0), WithJsonSchema(_COUNT_JSON)]
PositiveCount = Annotated[int, BeforeValidator(parse_count), Field(gt=0), WithJsonSchema(_COUNT_JSON)]
Fraction = Annotated[float, BeforeValidator(parse_fraction), Field(ge=0, lt=1),
                     WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0, "exclusiveMaximum": 1}, _PERCENT_JSON]})]
# Shares of a whole only known at plan time ("2%" of the steps, "10%" of the peak lr) stay strings.
StepsOrPercent = Annotated[Union[int, str], BeforeValidator(_steps_or_percent),
                           WithJsonSchema({"anyOf": [{"type": "integer", "minimum": 0}, _PERCENT_JSON]})]
NumberOrPercent = Annotated[Union[float, str], BeforeValidator(_number_or_percent),
                            WithJsonSchema({"anyOf": [{"type": "number", "minimum": 0}, _PERCENT_JSON]})]
AutoOrPositive = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_positive),
                           WithJsonSchema({"anyOf": [{"const": "auto"}, {"type": "integer", "minimum": 1}]})]
# YAML reads yes/no/on/off as booleans, and pydantic would take True as 1: refuse that for numbers.
def _not_bool(value):
    if isinstance(value, bool):
        raise ValueError(f"expected a number, got {str(value).lower()}")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]
# inf passes gt=0 and would end as a NaN weight or an infinite step count: every float is finite.
Float = Annotated[float, BeforeValidator(_not_bool), Field(allow_inf_nan=False)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=64)]


def resolve_percent(value: int | float | str, whole: float) -> float:
    """'10%' of `whole`, or the absolute value itself."""
    if isinstance(value, str):
        return float(value.strip().rstrip("%").strip()) / 100 * whole
    return value


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
