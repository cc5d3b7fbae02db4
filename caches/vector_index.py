"""Inner-product FAISS indexes with caller-chosen int64 ids: on a GPU when asked for and present.

    index = make_ip_index(dim, use_gpu=settings.faiss_gpu)
    index.add_with_ids(vectors, ids); index.search(queries, k)

One code path for both: the flat index is built on the CPU and, only when the caller asks for a
GPU and this process sees one (faiss-gpu build, `faiss.get_num_gpus() > 0`, i.e. a Ray replica
given `num_gpus`), copied to it with `index_cpu_to_gpu`. Otherwise the CPU index is used as it is,
so laptops, CI and CPU-only replicas run exactly the code a GPU replica runs, minus the copy.

The id map stays on the CPU around the (GPU or CPU) flat index. A GPU flat index does not
support `remove_ids`: callers that remove entries rebuild the index, or stay on the CPU.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import faiss

log = logging.getLogger("tierserve.vector_index")

_resources: Any = None  # faiss.StandardGpuResources: one per process (it holds GPU scratch memory)
_lock = threading.Lock()


def gpu_count() -> int:
    """GPUs this process can use through FAISS (0 on a faiss-cpu build or with none visible)."""
    if not hasattr(faiss, "StandardGpuResources"):
        return 0
    try:
        return int(faiss.get_num_gpus())
    except Exception:  # a broken driver is "no GPU" here, not a failed replica
        log.warning("faiss.get_num_gpus() failed; using the CPU", exc_info=True)
        return 0


def _gpu_resources() -> Any:
    global _resources
    with _lock:
        if _resources is None:
            _resources = faiss.StandardGpuResources()
        return _resources


# The most neighbours a GPU index returns per query: FAISS's GPU k-selection limit
# (GPU_MAX_SELECTION_K in faiss/gpu/utils/DeviceDefs.cuh, 2048 on CUDA); a larger k raises.
GPU_MAX_K = 2048


def make_ip_index(dim: int, use_gpu: bool = False, *, device: int = 0) -> Any:
    """An `IndexIDMap2` over a flat inner-product index of `dim` dimensions, on GPU `device` when
    `use_gpu` and one is visible, on the CPU otherwise. `on_gpu(index)` tells which."""
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    flat = faiss.IndexFlatIP(dim)
    if use_gpu:
        n = gpu_count()
        if n > device:
            flat = faiss.index_cpu_to_gpu(_gpu_resources(), device, flat)
        else:
            log.info("FAISS GPU asked for but %d GPU(s) visible to this process: using the CPU", n)
    index = faiss.IndexIDMap2(flat)
    # The id map holds the flat index by pointer; faiss' wrapper keeps the Python object (and so
    # its GPU memory) alive in referenced_objects. Checked, because a dangling pointer would crash.
    assert any(obj is flat for obj in getattr(index, "referenced_objects", [])), "faiss no longer keeps the inner index alive"
    return index


def on_gpu(index: Any) -> bool:
    """True when the flat index inside `index` lives on a GPU."""
    inner = faiss.downcast_index(index.index) if hasattr(index, "id_map") else index
    return type(inner).__name__.startswith("Gpu")
