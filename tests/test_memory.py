"""``himix_monai.memory.configure_allocator``: glibc's mmap threshold set at the bundle's start-up, never on import."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from himix_monai import memory
from himix_monai.memory import DEFAULT_MMAP_THRESHOLD, M_MMAP_THRESHOLD, configure_allocator

REPO = Path(__file__).resolve().parents[1]
ON_GLIBC = memory.glibc_mallopt() is not None


def run_python(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (the allocator is per process) and return the JSON it prints last."""
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_importing_the_package_never_calls_mallopt():
    """Fails if importing himix_monai (its network, bundle-facing modules, or memory itself) changes the allocator:
    the setting belongs to the bundle's start-up, not to whoever imports the package. Every ``mallopt`` looked up
    through ctypes is recorded; only the explicit call may show up."""
    result = run_python(
        """
        import ctypes, json
        calls = []
        real_cdll = ctypes.CDLL
        class RecordingCDLL:
            def __init__(self, *args, **kwargs):
                self._lib = real_cdll(*args, **kwargs)
            def __getattr__(self, name):
                function = getattr(self._lib, name)
                if name != "mallopt":
                    return function
                class Recorder:
                    argtypes = restype = None
                    def __call__(self, *args):
                        calls.append(list(args))
                        return function(*args)
                return Recorder()
        ctypes.CDLL = RecordingCDLL
        import himix_monai, himix_monai.networks, himix_monai.inferers, himix_monai.handlers, himix_monai.memory
        on_import = list(calls)
        configured = himix_monai.memory.configure_allocator()
        print(json.dumps({"on_import": on_import, "after": calls, "configured": configured}))
        """
    )
    assert result["on_import"] == []
    if ON_GLIBC:
        assert result["configured"] is True
        assert result["after"] == [[M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD]]


@pytest.mark.skipif(not ON_GLIBC, reason="glibc only")
@pytest.mark.parametrize("configure", [False, True])
def test_configure_allocator_maps_large_blocks_after_glibc_raised_its_threshold(configure: bool):
    """Fails if the call does not reach glibc: once a 24 MiB block was freed, glibc's dynamic threshold puts an
    8 MiB block on the heap (where freed blocks fragment it); after ``configure_allocator`` (2 MiB) such a block
    gets its own mapping (``mallinfo2().hblks``: blocks in their own mappings). One fresh process per case."""
    result = run_python(
        f"""
        import ctypes, json
        from himix_monai.memory import configure_allocator
        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        libc = ctypes.CDLL(None)
        libc.mallinfo2.restype = MallInfo2
        libc.malloc.restype = ctypes.c_void_p
        libc.malloc.argtypes = [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        libc.free(libc.malloc(24 << 20))  # raises glibc's dynamic threshold to 24 MiB
        configured = configure_allocator() if {configure} else None
        before = libc.mallinfo2().hblks
        block = libc.malloc(8 << 20)
        print(json.dumps({{"configured": configured, "mapped": libc.mallinfo2().hblks - before}}))
        """
    )
    assert result == ({"configured": True, "mapped": 1} if configure else {"configured": None, "mapped": 0})


def test_configure_allocator_is_a_no_op_off_glibc(monkeypatch):
    """Fails if the call fails (or claims success) on macOS/Windows or on a Linux C library without glibc's
    ``gnu_get_libc_version`` (musl)."""
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.glibc_mallopt() is None
    assert configure_allocator() is False

    class Musl:
        mallopt = staticmethod(lambda *args: pytest.fail("mallopt called off glibc"))

        def __getattr__(self, name):
            raise AttributeError(name)

    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda *args, **kwargs: Musl())
    assert configure_allocator() is False


@pytest.mark.parametrize("value", [0, -1, 2.5, True, "4194304"])
def test_configure_allocator_rejects_a_bad_threshold(value):
    with pytest.raises(ValueError, match="mmap_threshold"):
        configure_allocator(value)


@pytest.mark.parametrize("option", [None, "true"])
def test_training_bundle_sets_the_allocator_at_start_up_only_when_asked(monkeypatch, option):
    """Fails if ``train.json``'s first ``initialize`` line does not call ``configure_allocator`` with
    ``--low_memory_allocator true``, or calls it by default (it costs ~20% of the step, issue 18), or the call moved
    to ``imports`` (which would run whenever the config is parsed)."""
    calls = []
    monkeypatch.setattr(memory, "configure_allocator", lambda *args: calls.append(args) or True)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "train.json"))
    if option is not None:
        parser["low_memory_allocator"] = option
    assert not any("configure_allocator" in line for line in parser["imports"])
    assert "configure_allocator" in parser["initialize"][0]
    parser.get_parsed_content("initialize#0")
    assert calls == ([()] if option == "true" else [])
