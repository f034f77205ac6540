"""Stand-in running statistics: the package's copy of the original's (same npz state layout), so
the original stand-in's module is reused."""

import importlib.util
from pathlib import Path

_path = Path(__file__).parents[3] / "original" / "util" / "runningstats.py"
_spec = importlib.util.spec_from_file_location("alphaedit_standin_runningstats", _path)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)

CombinedStat, SecondMoment = _module.CombinedStat, _module.SecondMoment
load_cached_state, save_cached_state, box_numpy_null = (_module.load_cached_state, _module.save_cached_state,
                                                        _module.box_numpy_null)
