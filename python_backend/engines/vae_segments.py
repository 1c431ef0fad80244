"""One rank's patch-parallel VAE decoder cut into engines at its exchanges.

The decoder's exchanges are all blocking (decoding runs once per image, so halo rows, GroupNorm
moments and the mid-block's keys/values must be this pass's), and an engine cannot wait for another
rank. So the patched decoder of ``core/patch_vae.py`` is traced once with ``torch.export``, every
blocking gather appearing as one ``distrifusion::gather_slabs`` node, and the graph is cut at those
nodes: a *piece* is the computation between two gathers, exported to ONNX (and compiled like the
UNet's segments). The manifest's *program* lists, in order, the pieces to run and the gathers to do
between them; ``SegmentedVaeDecoder`` runs it with the rank's real exchange.

The pieces are the same patched modules the eager decoder runs (not a second implementation of the
decoder), so what the eager path computes is what the engines compute.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from ..core.context import PatchContext
from ..core.model import unscale_latents
from ..core.modes import Mode
from ..core.patch_vae import decoder_layout, patch_vae_decoder

VAE_EXPORT_FORMAT = 3  # bump when the pieces' contents or names change: it is part of the build cache key


@torch.library.custom_op("distrifusion::gather_slabs", mutates_args=())
def gather_slabs(tensor: torch.Tensor, key: str, sizes: list[int], dim: int) -> torch.Tensor:
    """Marks a blocking all-gather in a traced decoder: every rank's ``tensor`` (``sizes[r]`` long along
    ``dim``), concatenated in rank order. Never run: the cut graph does the gather between pieces."""
    raise RuntimeError(f"{key}: a traced gather runs between the decoder's pieces, not inside one")


@gather_slabs.register_fake
def _gathered_shape(tensor, key, sizes, dim):
    shape = list(tensor.shape)
    shape[dim] = sum(sizes)
    return tensor.new_empty(shape)


def concat_dim(shapes: list[tuple[int, ...]]) -> int:
    """The dimension along which the ranks' shapes differ (unequal slabs), else 0."""
    differing = [d for d in range(len(shapes[0])) if len({s[d] for s in shapes}) > 1]
    if len(differing) > 1:
        raise ValueError(f"shapes differ in more than one dimension: {shapes}")
    return differing[0] if differing else 0


class _TracingExchange:
    """Stands in for the decoder's exchange while it is traced: a gather becomes a graph node."""

    step = 0

    def gather(self, key, tensor, shapes):
        dim = concat_dim(shapes)
        sizes = [int(s[dim]) for s in shapes]
        return list(torch.ops.distrifusion.gather_slabs(tensor, key, sizes, dim).split(sizes, dim=dim))

    def reset(self):
        """Nothing is held."""

    def drain(self):
        """Nothing is in flight."""


class _SlabDecoder(nn.Module):
    """Latent slab (as the denoiser returns it) -> image slab in [-1, 1], as ``model.vae_decode``."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        return self.vae.decode(unscale_latents(self.vae, latents), return_dict=False)[0]


def trace_decoder(vae, latent_shape: tuple[int, ...], size: int, index: int,
                  unit_rows: int) -> tuple[torch.fx.GraphModule, tuple[int, int]]:
    """The patched decoder of slab ``index`` of ``size`` for full latents of ``latent_shape``, traced
    (the slabs as ``decoder_layout`` cuts them with the denoiser's ``unit_rows``), and the slab's rows."""
    layout = decoder_layout(latent_shape[2], size, index, unit_rows)
    context = PatchContext(layout, _TracingExchange(), mode=Mode.FULL_SYNC, warmup_steps=0)
    vae = patch_vae_decoder(copy.deepcopy(vae), context)  # the caller's VAE stays as it was
    start, stop = layout.row_range(latent_shape[2])
    slab = torch.zeros(latent_shape[0], latent_shape[1], stop - start, latent_shape[3], dtype=vae.dtype)
    with torch.no_grad():
        program = torch.export.export(_SlabDecoder(vae), (slab,), strict=False)
    graph_module = program.module()
    for node in list(graph_module.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            graph_module.graph.erase_node(node)  # export's own dtype checks: not computation, not exportable
    graph_module.graph.lint()
    return graph_module, (start, stop)


def _is_gather(node) -> bool:
    return node.op == "call_function" and node.target is torch.ops.distrifusion.gather_slabs.default


def cut_at_gathers(graph_module: torch.fx.GraphModule) -> tuple[list[dict], str, str]:
    """Splits a traced decoder at its gathers. Returns (program, input name, output name): the program
    is a list of {"piece": GraphModule, "inputs", "example_specs", "outputs"} and {"gather": key,
    "input", "output", "sizes", "dim"} entries in run order, named by the traced graph's value names."""
    nodes = list(graph_module.graph.nodes)
    (placeholder,) = [n for n in nodes if n.op == "placeholder"]
    (output,) = [n for n in nodes if n.op == "output"]
    (result,) = output.args[0] if isinstance(output.args[0], (tuple, list)) else (output.args[0],)
    runs, current = [], []
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if _is_gather(node):
            runs += [current, node]
            current = []
        else:
            current.append(node)
    runs.append(current)
    program = []
    for run in runs:
        if isinstance(run, list):
            if run:
                program.append(_piece(graph_module, run, result))
            continue
        source, key, sizes, dim = run.args
        program.append({"gather": key, "input": source.name, "output": run.name, "sizes": list(sizes), "dim": dim})
    return program, placeholder.name, result.name


def _piece(graph_module, run: list, result) -> dict:
    """One run of nodes as its own GraphModule: values made elsewhere come in, values used elsewhere go out."""
    inside = set(run)
    graph = torch.fx.Graph()
    env, sources = {}, []

    def value(arg):
        if arg not in env:
            if arg.op == "get_attr":
                env[arg] = graph.get_attr(arg.target)
            else:
                _require_tensor(arg)
                env[arg] = graph.placeholder(arg.name)
                sources.append(arg)
        return env[arg]

    for node in run:
        env[node] = graph.node_copy(node, value)
    outputs = [node for node in run
               if node is result or any(user not in inside for user in node.users)]
    for node in outputs:
        _require_tensor(node)
    graph.output(tuple(env[node] for node in outputs))
    graph.lint()
    specs = [(tuple(node.meta["val"].shape), node.meta["val"].dtype) for node in sources]
    return {"piece": torch.fx.GraphModule(graph_module, graph), "inputs": [node.name for node in sources],
            "example_specs": specs, "outputs": [node.name for node in outputs]}


def _require_tensor(node) -> None:
    if not isinstance(node.meta.get("val"), torch.Tensor):
        raise ValueError(f"the decoder's cut would pass {node.name} ({node.meta.get('val')!r}) between "
                         "engines; only tensors can travel between them")


def _free_after(program: list[dict], output: str) -> None:
    """Adds to every entry the values no later entry needs (so the runner drops them at once)."""
    last = {}
    for position, entry in enumerate(program):
        for name in [entry["input"]] if "gather" in entry else entry["inputs"]:
            last[name] = position
    for position, entry in enumerate(program):
        entry["free"] = sorted(name for name, at in last.items() if at == position and name != output)


def export_decoder(vae, latent_shape: tuple[int, ...], size: int, index: int, unit_rows: int, out_dir: Path,
                   progress=None) -> dict:
    """Exports slab ``index`` of ``size``'s decoder pieces to ``out_dir`` (float32: SDXL's VAE overflows in
    float16); returns the manifest, also written there."""
    from .export import _export

    out_dir.mkdir(parents=True, exist_ok=True)
    if vae.dtype != torch.float32:
        raise ValueError(f"the decoder pieces are exported in float32; got a {vae.dtype} VAE")
    graph_module, (start, stop) = trace_decoder(vae, latent_shape, size, index, unit_rows)
    program, input_name, output_name = cut_at_gathers(graph_module)
    pieces = [entry for entry in program if "piece" in entry]
    with torch.no_grad():
        for number, entry in enumerate(pieces):
            piece, specs = entry.pop("piece"), entry.pop("example_specs")
            # shapes are all the export needs (they are static): zeros stand in for the values
            args = tuple(torch.zeros(shape, dtype=dtype) for shape, dtype in specs)
            entry["file"] = f"piece{number:03d}.onnx"
            _export(piece, args, out_dir / entry["file"], entry["inputs"], entry["outputs"])
            if progress:
                progress(number + 1, len(pieces))
    _free_after(program, output_name)
    manifest = {"format": VAE_EXPORT_FORMAT, "latent_shape": list(latent_shape), "size": size, "index": index,
                "rows": [start, stop], "input": input_name, "output": output_name, "program": program}
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def export_every_rank(model: str, latent_shape: tuple[int, ...], size: int, unit_rows: int, out_root: Path,
                      workers: int | None = None, progress=None) -> list[dict]:
    """Every rank's decoder pieces under ``out_root/rank{r}``, the ranks exported side by side in up to
    ``workers`` processes (default: one per CPU core, at most one per rank; tracing is single-threaded
    Python, so one process would use one core). ``progress(done, total)`` after each rank. Returns the
    manifests in rank order."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = max(1, min(size, workers or os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    manifests = [None] * size
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {pool.submit(_export_rank, model, tuple(latent_shape), size, rank, unit_rows,
                            str(Path(out_root) / f"rank{rank}"), threads): rank for rank in range(size)}
        for done, job in enumerate(as_completed(jobs), start=1):
            manifests[jobs[job]] = job.result()
            if progress:
                progress(done, size)
    return manifests


def _export_rank(model: str, latent_shape, size: int, rank: int, unit_rows: int, out_dir: str, threads: int) -> dict:
    from ..core.model import load_vae

    torch.set_num_threads(threads)
    return export_decoder(load_vae(model, torch.device("cpu")), latent_shape, size, rank, unit_rows, Path(out_dir))


class SegmentedVaeDecoder:
    """Runs one rank's decoder pieces, doing each gather of the program through ``exchange``."""

    def __init__(self, folder: Path, backend: str, world_size: int, device: torch.device | str = "cpu"):
        from .runners import make_runner, share_device_memory

        self.folder, self.device = Path(folder), torch.device(device)
        self.manifest = json.loads((self.folder / "manifest.json").read_text())
        if self.manifest["size"] != world_size or self.manifest.get("format") != VAE_EXPORT_FORMAT:
            raise ValueError(f"the decoder pieces at {self.folder} were built for {self.manifest['size']} ranks "
                             f"(format {self.manifest.get('format')}); this group has {world_size} (format "
                             f"{VAE_EXPORT_FORMAT}): rebuild with `distrifusion build`")
        suffix = ".onnx" if backend == "onnxruntime" else ".plan"
        # each of the many pieces would otherwise keep its own peak memory (an arena, a TensorRT block)
        self.runners = {entry["file"]: make_runner(backend, self.folder / Path(entry["file"]).with_suffix(suffix),
                                                   once_per_request=True)
                        for entry in self.manifest["program"] if "file" in entry}
        self.device_memory = share_device_memory(self.runners.values())

    def check(self, latent_shape: tuple[int, ...], rows: tuple[int, int]) -> None:
        """Raises ValueError unless these pieces were built for full latents of ``latent_shape`` and the slab
        ``rows``."""
        built = (tuple(self.manifest["latent_shape"]), tuple(self.manifest["rows"]))
        if built != (tuple(latent_shape), tuple(rows)):
            raise ValueError(f"the decoder engines at {self.folder} were built for latents {list(built[0])}, rows "
                             f"{list(built[1])}; this decode has latents {list(latent_shape)}, rows {list(rows)}")

    def decode_slab(self, latent_slab: torch.Tensor, exchange) -> torch.Tensor:
        """The image slab of this rank's ``latent_slab``; every rank of ``exchange`` decodes at once."""
        values = {self.manifest["input"]: latent_slab.float()}
        for entry in self.manifest["program"]:
            if "gather" in entry:
                tensor, dim = values[entry["input"]], entry["dim"]
                shapes = [tuple(tensor.shape[:dim]) + (n,) + tuple(tensor.shape[dim + 1:]) for n in entry["sizes"]]
                values[entry["output"]] = torch.cat(exchange.gather(entry["gather"], tensor.contiguous(), shapes), dim=dim)
            else:
                outputs = self.runners[entry["file"]].run({name: values[name] for name in entry["inputs"]})
                values.update((name, tensor.to(self.device)) for name, tensor in outputs.items())
            for name in entry["free"]:
                values.pop(name, None)
        return values[self.manifest["output"]]
