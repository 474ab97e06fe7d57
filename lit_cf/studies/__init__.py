"""Studies in the library: ``lit-cf study --config configs/study/<name>.yaml`` (see :mod:`.core`).

Importing this package registers the built-in studies (one module each, imported below by
name: a config only ever picks among these).
"""

# the built-in studies, one import per module (each registers its Study class)
from lit_cf.studies import ablate_disc, repro_cf_attacks, repro_duq, student_disc  # noqa: F401
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study, run_study, study_registry

__all__ = ["ModelSpec", "Study", "StudyContext", "StudyResult", "register_study", "run_study", "study_registry"]
