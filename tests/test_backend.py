"""rnncap.backend: choosing NumPy or CuPy, and moving arrays between them."""
from __future__ import annotations

import numpy as np
import pytest

from rnncap import backend
from rnncap.backend import get_array_module, gpu_available, to_device, to_numpy, xp_for


def test_get_array_module_numpy_and_non_arrays():
    a = np.ones(3)
    assert get_array_module(a) is np
    assert get_array_module(a, a.astype(np.float32)) is np
    assert get_array_module() is np
    assert get_array_module([1, 2], 3.0, None) is np


def test_get_array_module_finds_the_device_array(xp):
    host, dev = np.ones(2), to_device(np.ones(2), xp)
    # Any device array among the arguments decides.
    assert get_array_module(host, dev) is xp
    assert get_array_module(dev, host) is xp


def test_to_numpy_returns_host_arrays(xp):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    back = to_numpy(to_device(a, xp))
    assert type(back) is np.ndarray and back.dtype == a.dtype
    np.testing.assert_array_equal(back, a)
    # Plain Python data comes back as an array too.
    np.testing.assert_array_equal(to_numpy([[1, 2], [3, 4]]), np.array([[1, 2], [3, 4]]))
    assert type(to_numpy(2.5)) is np.ndarray


def test_to_device_round_trip_and_no_copy_on_host(xp):
    a = np.random.default_rng(0).standard_normal((4, 5))
    d = to_device(a, xp)
    assert get_array_module(d) is xp
    assert d.shape == a.shape and d.dtype == a.dtype
    np.testing.assert_array_equal(to_numpy(d), a)
    if xp is np:
        assert d is a  # already on the host: nothing copied
    else:
        assert to_device(d, xp) is d or to_device(d, xp).data.ptr == d.data.ptr


def test_xp_for_cpu_names():
    assert xp_for("cpu") is np
    assert xp_for("numpy") is np


@pytest.mark.parametrize("name", ["tpu", "CPU", "", "cuda:0"])
def test_xp_for_unknown_device_is_a_value_error(name):
    with pytest.raises(ValueError, match="unknown device"):
        xp_for(name)


@pytest.mark.parametrize("name", ["gpu", "cuda", "cupy"])
def test_xp_for_gpu_without_cupy_says_what_to_do(name, monkeypatch):
    # Force the no-CuPy case whatever this machine has.
    monkeypatch.setattr(backend, "cupy", None)
    assert not backend.gpu_available()
    with pytest.raises(RuntimeError) as err:
        xp_for(name)
    message = str(err.value)
    assert "CuPy" in message and "pip install" in message
    assert "\n" not in message  # one clear line


def test_gpu_available_matches_xp_for():
    if gpu_available():
        xp = xp_for("gpu")
        assert xp is not np and get_array_module(xp.zeros(1)) is xp
    else:
        with pytest.raises(RuntimeError):
            xp_for("gpu")


def test_model_to_device_and_back(xp, device):
    from rnncap.models.model import CaptioningModel

    m = CaptioningModel(9, 4, 3, 5, cell_type="lstm", seed=0)
    before = {k: v.copy() for k, v in m.params.items()}
    assert m.to(device) is m
    assert m.xp is xp
    assert all(get_array_module(v) is xp for v in m.params.values())
    m.to("cpu")
    assert m.xp is np
    for k, v in m.numpy_params().items():
        np.testing.assert_array_equal(v, before[k])


_CHURN = """
import resource, threading, numpy as np
from rnncap.backend import retain_freed_memory
if {retain}:
    assert retain_freed_memory() is True
def churn():  # what a sharded step does: big arrays, touched, freed, on two threads
    def work():
        arrays = [np.ones(2_500_000, np.float32) for _ in range(6)]  # 10 MB each
        del arrays
    t = threading.Thread(target=work); t.start(); work(); t.join()
churn(); churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    churn()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_retain_freed_memory_stops_the_page_faults_of_arrays_freed_and_made_again():
    import subprocess
    import sys

    def faults(retain):
        out = subprocess.run([sys.executable, "-c", _CHURN.format(retain=retain)],
                             capture_output=True, text=True, check=True)
        return float(out.stdout.strip())

    pages = 2 * 6 * 2_500_000 * 4 / 4096  # touched per round: 29,000 pages
    without, kept = faults(False), faults(True)
    # glibc's default gives part of it back (4,700 faults a round here); kept, the
    # pages are reused
    assert kept < 0.01 * pages < without, (kept, without)
