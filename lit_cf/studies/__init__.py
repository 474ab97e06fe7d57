"""Studies in the library: ``lit-cf study --config configs/study/<name>.yaml`` (see :mod:`.core`).

Importing this package registers the built-in studies: one module each, imported below by
name (a config only ever picks among these; nothing read from a file decides an import).
"""

# the built-in studies, one import line per module (each registers its Study class)
import lit_cf.studies.ablate_disc  # noqa: F401
import lit_cf.studies.battery  # noqa: F401
import lit_cf.studies.ground_truth  # noqa: F401
import lit_cf.studies.quickstart  # noqa: F401
import lit_cf.studies.repro_cf_attacks  # noqa: F401
import lit_cf.studies.repro_duq  # noqa: F401
import lit_cf.studies.student_disc  # noqa: F401
import lit_cf.studies.vaeth  # noqa: F401
from lit_cf.studies.core import ModelSpec, Study, StudyContext, StudyResult, register_study, run_study, study_registry

__all__ = ["ModelSpec", "Study", "StudyContext", "StudyResult", "register_study", "run_study", "study_registry"]
