"""One wording of pydantic's validation errors for every layer."""

import pydantic
import pytest

from deepfusion_core.errors import validation_errors, validation_lines


class Inner(pydantic.BaseModel):
    size: int

    @pydantic.field_validator("size")
    @classmethod
    def positive(cls, v):
        if v <= 0:
            raise ValueError(f"must be positive, got {v}")
        return v


class Outer(pydantic.BaseModel):
    items: list[Inner]
    name: str

    @pydantic.model_validator(mode="after")
    def named(self):
        if self.name == "none":
            raise ValueError("a name is needed")
        return self


def error(raw) -> pydantic.ValidationError:
    with pytest.raises(pydantic.ValidationError) as info:
        Outer.model_validate(raw)
    return info.value


def test_a_line_per_error_located_without_pydantics_prefix():
    e = error({"items": [{"size": 1}, {"size": -2}]})
    assert validation_lines(e) == ["items.1.size: must be positive, got -2",
                                   "name: Field required"]
    assert validation_lines(e, "profiles.p.data") == [
        "profiles.p.data.items.1.size: must be positive, got -2",
        "profiles.p.data.name: Field required"]


def test_an_error_of_the_whole_model_is_put_under_the_prefix_or_the_models_name():
    e = error({"items": [], "name": "none"})
    assert validation_lines(e) == ["Outer: a name is needed"]
    assert validation_lines(e, "stages") == ["stages: a name is needed"]
    assert validation_errors(e) == [("", "a name is needed")]


def test_where_words_locations_and_skips_errors():
    e = error({"items": [{"size": 0}]})
    skip_missing = lambda loc: None if loc == ("name",) else "/".join(map(str, loc))  # noqa: E731
    assert validation_errors(e, skip_missing) == [("items/0/size", "must be positive, got 0")]
