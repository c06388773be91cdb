"""Compile the Triton kernels marfast launches for an H100 (sm_90) on a machine without a GPU.

Triton compiles ahead of time for a named target. `record_launches()` runs marfast code under the
CPU interpreter with every kernel launch recorded instead of executed (the launchers' GPU block
configurations switched on, every tuning candidate launched once); `compile_for_h100(launches)`
compiles the distinct recorded launches exactly as the runtime would on the device (the same
argument specialisation: 16-byte alignment of pointers, integers divisible by 16 or equal to 1)
and returns each compiled kernel's resource use (shared memory, registers, local memory: register
spills), facts about its PTX (asynchronous copies, atomics, grid dependency control) and about the
memory ordering of its SASS (fences and L1 invalidations around release and acquire operations).
Compilation runs in a child process without TRITON_INTERPRET (under the interpreter Triton's own
library functions are interpreted and cannot be compiled).

The GPU machine runs another Triton release (3.6) than this one: a kernel that compiles here is
very likely, not certainly, to compile there; the GPU suite is the final word.
"""
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile

import torch

# global loads, stores, atomics and asynchronous copies (not prefetches) in PTX
GLOBAL_MEMORY_PTX = re.compile(r"\b(?:ld\.global|st\.global|atom\.global|red\.global|cp\.async)\b")
H100_SHARED_BYTES = 232448  # the most dynamic shared memory one block may use on sm_90 (227 KiB)
H100_REGISTERS_PER_SM = 65536  # 32-bit registers of one SM, shared by its resident blocks
H100_SMS = 132


@contextlib.contextmanager
def record_launches(monkeypatch):
    """Yield a list that collects every Triton launch made inside the block (none is executed), as
    JSON-able descriptions: kernel module and name, arguments (tensors by dtype and alignment)."""
    from triton.runtime.interpreter import InterpretedFunction

    from marfast.kernels import adaln_input, add_layernorm, ddpm_sample_loop, ddpm_step, linear_fused

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "args": [_describe(a) for a in args],
                         "kwargs": {k: _describe(v) for k, v in kwargs.items()}})

    monkeypatch.setattr(InterpretedFunction, "run", record)
    for module in (linear_fused, ddpm_step, adaln_input, add_layernorm, ddpm_sample_loop):
        monkeypatch.setattr(module, "gpu_configs", lambda device: True)
        monkeypatch.setattr(module, "programmatic_launch", lambda device: {"PDL": True, "launch_pdl": True})
    monkeypatch.setattr(ddpm_sample_loop, "resident_programs", lambda device: H100_SMS)
    monkeypatch.setattr(linear_fused, "_TUNED", {})
    monkeypatch.setattr(linear_fused, "_PROLOGUE_CHOICE", {})
    monkeypatch.setattr(linear_fused, "_TIMINGS", {})
    monkeypatch.setattr(linear_fused, "time_launches", lambda run, repeats=1, queue_cycles=0: (run(), 1.0)[1])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)  # CPU builds have no CUDA runtime
    yield launches


def _describe(value):
    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).replace("torch.", ""), "aligned": value.data_ptr() % 16 == 0}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


def compile_for_h100(launches):
    """Compile the distinct launches for sm_90 (in a child process); returns one dict per kernel:
    name, constants, num_warps, num_stages, launch_pdl, shared_bytes, registers, local_bytes, counts
    of PTX instructions: async_copies (async_copies_16_bytes: those of 16-byte vectors),
    warpgroup_mmas, release_acquire_atomics, l2_loads (ld.global.cg), loads_after_last_mma (global
    loads other than ld.global.cg after the last matrix-multiply instruction: loads an epilogue
    waits for), l2_prefetches (and
    l2_prefetches_before_wait: those before the first griddepcontrol.wait), grid_dependency_waits,
    launch_dependents; and memory_before_wait: whether any global load, store, atomic or
    asynchronous copy (not a prefetch) precedes the first griddepcontrol.wait in the PTX.
    Memory ordering: acquire_loads (PTX ld.global.gpu.acquire), non_coherent_loads (PTX
    ld.global.nc: a path that can return data older than another program's write before a
    barrier), and from the SASS: invalidating_acquire_loads (strong GPU-scope loads followed by
    CCTL.IVALL, the L1 invalidation that makes later plain loads see other SMs' writes) and
    fenced_atomics (atomics after a MEMBAR at GPU scope, the release, and followed by CCTL.IVALL).
    A plain load reads through the SM's L1, so a barrier is only as good as these."""
    distinct = list({json.dumps(launch, sort_keys=True): launch for launch in launches}.values())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, __file__], input=json.dumps(distinct), capture_output=True, text=True,
                          env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"sm_90 compilation failed:\n{done.stderr[-6000:]}")
    return json.loads(done.stdout)


def _argument(description):
    if isinstance(description, dict):
        dtype = getattr(torch, description["tensor"])
        storage = torch.empty(64, dtype=dtype)
        return storage if description["aligned"] else storage[1:]
    return description


def _compile_all(launches):
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    results = []
    for launch in launches:
        jit = getattr(importlib.import_module(launch["module"]), launch["name"])
        args = [_argument(a) for a in launch["args"]]
        kwargs = dict({k: _argument(v) for k, v in launch["kwargs"].items()}, debug=False)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
        kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
        triton_dir = os.path.dirname(triton.__file__)
        usage = _resource_usage(kernel.asm["cubin"], triton_dir)
        sass = _sass_instructions(kernel.asm["cubin"], triton_dir)
        ptx = kernel.asm["ptx"]
        before_wait = ptx.split("griddepcontrol.wait")[0]
        mma_ends = [m.end() for m in re.finditer(r"\b(?:mma\.sync|wgmma\.mma_async)\b", ptx)]
        after_mma = ptx[mma_ends[-1]:] if mma_ends else ""
        results.append({"name": launch["name"],
                        "constants": {jit.arg_names[path[0]]: value for path, value in constexprs.items()},
                        "num_warps": options.num_warps, "num_stages": options.num_stages,
                        "launch_pdl": options.launch_pdl,
                        "shared_bytes": kernel.metadata.shared, "registers": usage["REG"],
                        "local_bytes": usage["LOCAL"] + usage["STACK"],
                        "async_copies": len(re.findall(r"\bcp\.async\.(?:ca|cg)|cp\.async\.bulk", ptx)),
                        "async_copies_16_bytes": len(re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^;]*\], 0x10\b",
                                                                ptx)),
                        "warpgroup_mmas": len(re.findall(r"\bwgmma\.mma_async", ptx)),
                        "release_acquire_atomics": len(re.findall(r"\batom\.global\.gpu\.acq_rel\.", ptx)),
                        "l2_loads": len(re.findall(r"\bld\.global\.cg\b", ptx)),
                        "loads_after_last_mma": len(re.findall(r"\bld\.global(?!\.cg\b)", after_mma)),
                        "l2_prefetches": len(re.findall(r"\bprefetch\.global\.L2", ptx)),
                        "l2_prefetches_before_wait": len(re.findall(r"\bprefetch\.global\.L2", before_wait)),
                        "grid_dependency_waits": len(re.findall(r"\bgriddepcontrol\.wait\b", ptx)),
                        "launch_dependents": len(re.findall(r"\bgriddepcontrol\.launch_dependents\b", ptx)),
                        "memory_before_wait": before_wait == ptx or GLOBAL_MEMORY_PTX.search(before_wait) is not None,
                        "acquire_loads": len(re.findall(r"\bld\.global\.gpu\.acquire\b", ptx)),
                        "non_coherent_loads": len(re.findall(r"\bld\.global\.nc\b", ptx)),
                        **_sass_memory_ordering(sass)})
    return results


def _cuobjdump(cubin, triton_dir, option):
    """The text `cuobjdump <option>` prints for `cubin` (Triton's bundled cuobjdump)."""
    cuobjdump = os.path.join(triton_dir, "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, option, f.name], check=True, capture_output=True, text=True).stdout


def _resource_usage(cubin, triton_dir):
    """{REG, STACK, LOCAL, ...} of the one kernel in `cubin`, from `cuobjdump -res-usage`."""
    text = _cuobjdump(cubin, triton_dir, "-res-usage")
    line = next(line for line in text.splitlines() if "REG:" in line)
    return {key: int(value) for key, value in re.findall(r"(\w+):(\d+)", line)}


def _sass_instructions(cubin, triton_dir):
    """The SASS instructions of `cubin`, in order, without addresses, predicates and operands
    (e.g. 'LDG.E.STRONG.GPU', 'CCTL.IVALL')."""
    text = _cuobjdump(cubin, triton_dir, "-sass")
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", text)


def _sass_memory_ordering(sass):
    """{invalidating_acquire_loads, fenced_atomics} (see `compile_for_h100`) of a SASS listing."""
    def next_is_invalidation(i):
        return i + 1 < len(sass) and sass[i + 1] == "CCTL.IVALL"

    acquire_loads = sum(1 for i, op in enumerate(sass)
                        if op.startswith("LDG.") and op.endswith(".STRONG.GPU") and next_is_invalidation(i))
    fenced = sum(1 for i, op in enumerate(sass)
                 if op.startswith("ATOMG.") and next_is_invalidation(i)
                 and any(prior.startswith("MEMBAR.") and prior.endswith(".GPU") for prior in sass[max(0, i - 3):i]))
    return {"invalidating_acquire_loads": acquire_loads, "fenced_atomics": fenced}


if __name__ == "__main__":
    json.dump(_compile_all(json.load(sys.stdin)), sys.stdout)
