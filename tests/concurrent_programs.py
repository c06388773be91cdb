"""Run a Triton kernel's programs concurrently under the CPU interpreter.

The interpreter runs a launch's programs one after another, so code where programs wait for or
hand work to each other (grid barriers, split-K arrival counters) only ever sees one order: every
earlier program finished before a later one starts. `concurrent_programs` runs each program of the
chosen kernels' launches in its own thread instead, all started before any is waited for, and
yields the GIL after every atomic, so programs interleave at the points where they communicate
and a program polling a barrier lets the others work. A launch whose programs are not all done
within LAUNCH_SECONDS (one waits for an arrival that never comes) fails the test, and so does a
program's error; either way the launch's other threads stop at their next atomic.

This checks the logic (who arrives, who reduces, who resets, which items each program takes), not
the GPU's memory model: the threads share one coherent memory.
"""
import inspect
import threading
import time

import pytest
import triton.language as tl  # noqa: F401 (the interpreter patches the `tl` in a launched function's globals)
from triton.runtime.interpreter import InterpreterBuilder, interpreter_builder

from marfast.kernels.linear_fused import interpreting

LAUNCH_SECONDS = 60

# on a GPU the programs really run concurrently: the tests marked `gpu` cover them there
needs_interpreter = pytest.mark.skipif(not interpreting(), reason="threads the Triton CPU interpreter's programs")


class _Abandoned(Exception):
    """Raised in a program's thread at its next atomic once its launch has been given up (timed out,
    or another of its programs failed)."""


def concurrent_programs(monkeypatch, *kernels):
    """For the rest of the test, launches of `kernels` (interpreted `@triton.jit` functions) run
    their programs in threads. Returns a list that gets each launch's program count."""
    local = threading.local()
    abandoned = threading.Event()
    monkeypatch.setattr(InterpreterBuilder, "grid_idx",
                        property(lambda self: getattr(local, "index", None),
                                 lambda self, index: setattr(local, "index", index)), raising=False)
    for name in ("create_atomic_rmw", "create_atomic_cas"):
        atomic = getattr(InterpreterBuilder, name)
        monkeypatch.setattr(InterpreterBuilder, name, _yielding(atomic, abandoned))
    launches = []
    for kernel in kernels:
        monkeypatch.setattr(kernel, "rewrite", _threaded(kernel.rewrite(), local, launches, abandoned))
    return launches


def _yielding(atomic, abandoned):
    def atomic_then_yield(self, *args, **kwargs):
        if abandoned.is_set() and threading.current_thread() is not threading.main_thread():
            raise _Abandoned()
        result = atomic(self, *args, **kwargs)
        time.sleep(0)
        return result
    return atomic_then_yield


def _threaded(program, local, launches, abandoned):
    """rewrite() for a kernel: the interpreter calls the returned function once per program (after
    setting the program's index); it starts the program in a thread, and the call for the last
    index joins them all (at most LAUNCH_SECONDS) and re-raises the first error."""
    threads, errors = [], []

    def start_program(**args):
        index = interpreter_builder.grid_idx

        def run():
            local.index = index
            try:
                program(**args)
            except BaseException as error:  # noqa: B036 (re-raised in the launching thread)
                errors.append(error)
                abandoned.set()  # the others stop at their next atomic instead of waiting for this one

        thread = threading.Thread(target=run, daemon=True)
        threads.append(thread)
        thread.start()
        if tuple(i + 1 for i in index) == tuple(interpreter_builder.grid_dim):
            deadline = time.monotonic() + LAUNCH_SECONDS
            for thread in threads:
                thread.join(max(0.0, deadline - time.monotonic()))
            first_error = errors[0] if errors else None
            unfinished = sum(thread.is_alive() for thread in threads)
            abandoned.set()
            for thread in threads:
                thread.join()
            abandoned.clear()
            launches.append(len(threads))
            threads.clear()
            errors.clear()
            if first_error is not None:
                raise first_error
            if unfinished:
                raise AssertionError(f"{unfinished} of the launch's {launches[-1]} programs were still running after "
                                     f"{LAUNCH_SECONDS} s (waiting for an arrival that never came?)")

    start_program.__signature__ = inspect.signature(program)
    start_program.__annotations__ = program.__annotations__  # which arguments are constexprs
    return lambda: start_program
