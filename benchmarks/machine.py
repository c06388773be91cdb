"""Machine metadata for benchmark results: NVML state of the GPU and software versions.

Everything here degrades to an explicit "unavailable: <reason>" entry instead of raising, so that
metadata collection never fails a benchmark run (CPU machines have no NVML at all).
"""
import importlib
import importlib.metadata
import os
import platform

import torch

# NVML clock-event ("throttle") reason bits, as defined by the NVML API.
THROTTLE_REASON_BITS = {
    0x001: "gpu_idle",
    0x002: "applications_clocks_setting",
    0x004: "sw_power_cap",
    0x008: "hw_slowdown",
    0x010: "sync_boost",
    0x020: "sw_thermal_slowdown",
    0x040: "hw_thermal_slowdown",
    0x080: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}

ATTENTION_MODULE_ABSENT = "sdpa/math (marfast.attention not present)"


def decode_throttle_reasons(mask):
    """NVML clock-event bitmask -> sorted list of reason names ("none" when the mask is 0)."""
    if mask == 0:
        return ["none"]
    names = [name for bit, name in THROTTLE_REASON_BITS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASON_BITS)
    if unknown:
        names.append(f"other_bits_{unknown:#x}")
    return sorted(names)


def _nvml():
    """The initialised pynvml module, or a string saying why it is unavailable."""
    try:
        import pynvml
    except ImportError:
        return "unavailable: nvidia-ml-py (pynvml) is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as error:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return f"unavailable: nvmlInit failed ({error})"
    return pynvml


def _as_text(value):
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_handle(pynvml, device_index):
    """NVML handle of the CUDA device `device_index`, matched by UUID (CUDA and NVML orders can differ)."""
    props = torch.cuda.get_device_properties(device_index)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}"), "uuid"
        except Exception:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device_index), "index (uuid lookup failed; CUDA_VISIBLE_DEVICES may reorder)"


def nvml_state(device_index=None):
    """Clocks, power, temperature and throttle reasons of one GPU as a flat dict (CPU: a reason string)."""
    if not torch.cuda.is_available():
        return {"nvml": "unavailable: no CUDA device"}
    pynvml = _nvml()
    if isinstance(pynvml, str):
        return {"nvml": pynvml}
    index = torch.cuda.current_device() if device_index is None else device_index
    try:
        handle, matched_by = _nvml_handle(pynvml, index)
    except Exception as error:
        return {"nvml": f"unavailable: no NVML handle for CUDA device {index} ({error})"}
    state = {"nvml_handle_matched_by": matched_by}

    def put(key, getter, scale=1.0):
        try:
            value = getter()
            state[key] = value * scale if isinstance(value, (int, float)) and scale != 1.0 else value
        except Exception as error:
            state[key] = f"unavailable: {error}"

    put("gpu_name", lambda: _as_text(pynvml.nvmlDeviceGetName(handle)))
    put("driver_version", lambda: _as_text(pynvml.nvmlSystemGetDriverVersion()))
    put("cuda_driver_version", lambda: pynvml.nvmlSystemGetCudaDriverVersion_v2())
    put("sm_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM))
    put("sm_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM))
    put("mem_clock_mhz", lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM))
    put("mem_clock_max_mhz", lambda: pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM))
    put("power_draw_w", lambda: pynvml.nvmlDeviceGetPowerUsage(handle), 1e-3)
    put("power_limit_w", lambda: pynvml.nvmlDeviceGetEnforcedPowerLimit(handle), 1e-3)
    put("temperature_c", lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))
    put("performance_state", lambda: f"P{pynvml.nvmlDeviceGetPerformanceState(handle)}")
    put("persistence_mode", lambda: bool(pynvml.nvmlDeviceGetPersistenceMode(handle)))
    put("memory_total_gib", lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30)

    def throttle_reasons():
        getter = getattr(pynvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
            pynvml.nvmlDeviceGetCurrentClocksThrottleReasons
        return decode_throttle_reasons(getter(handle))

    put("throttle_reasons", throttle_reasons)
    return state


def _package_version(*distributions):
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def attention_backend():
    """The attention backend marfast uses, as a string or a dict of strings.

    Asks `marfast.attention.active_backend` when that module exists (on CUDA for bf16 inputs at
    MAR's head dims 64 and 80, on the CPU for fp32); says so explicitly when it does not exist
    (then MAR's transformer calls PyTorch SDPA with its default backend choice).
    """
    try:
        attention = importlib.import_module("marfast.attention")
    except ModuleNotFoundError as error:
        if error.name != "marfast.attention":
            return f"error importing marfast.attention: {error}"
        return ATTENTION_MODULE_ABSENT
    reporter = getattr(attention, "active_backend", None)
    if reporter is None:
        return "unknown (marfast.attention has no active_backend())"
    report = {}
    requested = getattr(attention, "requested_backend", None)
    if requested is not None:
        report["requested"] = _describe_call(requested)
    if torch.cuda.is_available():
        for head_dim in (64, 80):
            report[f"cuda_bf16_head_dim{head_dim}"] = _describe_call(
                reporter, torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, head_dim)
    else:
        report["cpu_fp32_head_dim64"] = _describe_call(reporter, torch.device("cpu"), torch.float32, 64)
    return report


def _describe_call(function, *args):
    try:
        return str(function(*args))
    except Exception as error:
        return f"error: {type(error).__name__}: {error}"


def software_info():
    """Versions of the packages that decide the numbers, and the CUDA device's properties."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        import marfast
        marfast_version = marfast.__version__
    except ImportError:
        marfast_version = "not importable"
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": triton_version,
        "flash_attn": _package_version("flash-attn", "flash_attn"),
        "flash_attn_4": _package_version("flash-attn-4"),
        "marfast": marfast_version,
        "attention_backend": attention_backend(),
        "marfast_env": {key: value for key, value in sorted(os.environ.items()) if key.startswith("MARFAST_")},
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            programmatic_dependent_launch=_programmatic_launch_state(),
            cuda_device_name=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            device_memory_gib=props.total_memory / 2**30,
            cudnn=str(torch.backends.cudnn.version()),
            tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        )
    else:
        info["torch_threads"] = torch.get_num_threads()
    return info


def _programmatic_launch_state():
    """Whether marfast's sampling kernels launch with PDL on the current CUDA device (or why not)."""
    try:
        from marfast.kernels.linear_fused import programmatic_launch
    except ImportError as error:
        return f"unknown ({error})"
    return "on" if programmatic_launch(torch.device("cuda", torch.cuda.current_device()))["PDL"] else "off"


def kernel_timings():
    """Every kernel configuration and way that marfast timed in this process
    (`marfast.kernels.linear_fused.timed_choices`), or why it is unknown."""
    try:
        from marfast.kernels.linear_fused import timed_choices
    except ImportError as error:
        return f"unknown ({error})"
    return timed_choices()


def device_label():
    """Short device name for file names and table headers, e.g. 'NVIDIA-H100-80GB-HBM3' or 'cpu'."""
    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    return "-".join(name.replace("/", " ").split())
