"""Methods declare which extra outputs are pictures; the run records it for the grids and the report."""

from __future__ import annotations

from lit_cf.explainers.pixel import PixelCounterfactual
from lit_cf.report.outputs import IMAGE_SEQUENCE, OutputSpec, declared_image_sequences


class _Staged(PixelCounterfactual):
    def declared_outputs(self) -> tuple[str, ...]:
        return ("stages", "score")


class _Captioned(_Staged):
    def output_specs(self) -> dict[str, OutputSpec]:
        return {"stages": OutputSpec(IMAGE_SEQUENCE, "p(target) 0.2, 0.4, 0.6, 0.8")}


def test_describe_records_declared_image_outputs():
    assert "outputs" not in PixelCounterfactual(steps=3).describe()  # nothing drawn: the record is unchanged
    staged = _Staged(steps=3).describe()
    assert staged["outputs"] == {"stages": {"kind": IMAGE_SEQUENCE, "caption": "stages of the optimisation, first to last"}}
    assert declared_image_sequences(staged) == {"stages": OutputSpec(IMAGE_SEQUENCE, "stages of the optimisation, first to last")}
    assert declared_image_sequences(_Captioned(steps=3).describe())["stages"].caption == "p(target) 0.2, 0.4, 0.6, 0.8"
