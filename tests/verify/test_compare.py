"""verify/compare.py's ErrorStats at the edges of float range."""
import math

import numpy as np

from onnxfp8.verify.compare import ErrorStats


def test_sqnr_of_an_infinite_error_is_minus_inf_not_a_crash():
    # format auto on a BERT export's masked attention scores (~-3.4e38): the predicted error overflows to inf
    assert ErrorStats(signal=7.75e81, noise=math.inf).sqnr_db == -math.inf
    assert ErrorStats(signal=7.75e81, noise=5.4e74).sqnr_db == 10 * math.log10(7.75e81 / 5.4e74)
    assert ErrorStats(signal=0.0, noise=1.0).sqnr_db == -math.inf
    assert ErrorStats(signal=1.0, noise=0.0).sqnr_db == math.inf


def test_update_matches_the_formula():
    ref = np.array([1.0, -2.0, 3.0], np.float32)
    q = np.array([1.0, -2.5, 3.0], np.float32)
    s = ErrorStats()
    s.update(ref, q)
    assert math.isclose(s.sqnr_db, 10 * math.log10(14.0 / 0.25), rel_tol=1e-6)
