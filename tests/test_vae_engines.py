"""The patch-parallel VAE decoder as engines: every rank's decoder traced, cut at its blocking gathers
into ONNX pieces, and run by ONNX Runtime through real gloo process groups with the real exchange
doing the gathers between pieces. The image equals one device's decoding."""

import json

import pytest
import torch

from conftest import relative_l2
from python_backend.core.model import load_vae, vae_decode
from python_backend.core.ranks import run_on_ranks

LATENTS = (1, 4, 16, 12)  # 128x96 images; 3 ranks get unequal slabs of 6, 5 and 5 latent rows
CASES = {"sdxl": (3, 1), "sd15": (2, 2)}  # family: (ranks, unit_rows), the SD 1.5 slabs in whole units


def _decode_on_ranks(ranks, model: str, build_dir: str, latents: torch.Tensor):
    """Every rank decodes on its pieces, then eagerly (recording the eager decoder's gathers)."""
    from python_backend.engines.loader import load_parallel_decoder

    unit_rows = CASES["sdxl" if "sdxl" in model else "sd15"][1]
    engines = load_parallel_decoder(model, ranks, "onnxruntime", build_dir)
    assert engines.engine is not None and engines.vae is None  # nothing but the pieces is loaded
    image = engines.decode(latents, unit_rows)
    held = engines.exchange.held_keys
    eager = load_parallel_decoder(model, ranks)
    eager.exchange.record = True
    eager_image = eager.decode(latents, unit_rows)
    gathered = [event.key for event in eager.exchange.events if event.kind == "blocking"]
    return image, eager_image, gathered, held


@pytest.fixture(scope="module")
def built(tiny_sdxl, tiny_sd15, tmp_path_factory):
    """Each family's decoder pieces for every rank, as ``build`` lays them out (``vae/rank{r}``)."""
    from python_backend.engines.vae_segments import export_decoder, export_every_rank

    root = tmp_path_factory.mktemp("vae-engines")
    folders = {}
    for family, model in (("sdxl", tiny_sdxl), ("sd15", tiny_sd15)):
        ranks, unit_rows = CASES[family]
        vae = load_vae(model, torch.device("cpu"))
        if family == "sdxl":  # side by side, as build does
            export_every_rank(str(model), LATENTS, ranks, unit_rows, root / family / "vae")
        else:  # in this process: the VAE given is left unpatched
            for rank in range(ranks):
                export_decoder(vae, LATENTS, ranks, rank, unit_rows, root / family / "vae" / f"rank{rank}")
        folders[family] = (model, root / family, vae)
    return folders


@pytest.mark.parametrize("family", sorted(CASES))
def test_decoder_pieces_decode_what_one_device_decodes(family, built):
    model, folder, vae = built[family]
    ranks, _ = CASES[family]
    latents = torch.randn(*LATENTS, generator=torch.Generator().manual_seed(3))
    reference = vae_decode(vae, latents)  # sd15: export left the VAE it was given unpatched
    image, eager_image, gathered, held = run_on_ranks(ranks, _decode_on_ranks, (str(model), str(folder), latents))
    error = relative_l2(image, reference)
    print(f"{family} decoder pieces at N = {ranks}: relative error {error:.2e} against one device")
    assert image.shape == reference.shape and error <= 1e-5
    assert relative_l2(image, eager_image) <= 1e-5 and held == []
    # the pieces are cut exactly at the eager decoder's exchanges: the same gathers, in the same order
    manifest = json.loads((folder / "vae" / "rank0" / "manifest.json").read_text())
    program_gathers = [entry["gather"] for entry in manifest["program"] if "gather" in entry]
    assert program_gathers + ["decoder.image"] == gathered
    pieces = [entry for entry in manifest["program"] if "file" in entry]
    assert len(pieces) == len(program_gathers) + 1
    assert all((folder / "vae" / "rank0" / entry["file"]).is_file() for entry in pieces)


def test_pieces_refuse_a_decode_they_were_not_built_for(built):
    from python_backend.core.patch_vae import ParallelVaeDecoder
    from python_backend.engines.vae_segments import SegmentedVaeDecoder

    _, folder, _ = built["sdxl"]
    with pytest.raises(ValueError, match="built for 3 ranks"):
        SegmentedVaeDecoder(folder / "vae" / "rank0", "onnxruntime", world_size=2)
    pieces = SegmentedVaeDecoder(folder / "vae" / "rank0", "onnxruntime", world_size=3)
    decoder = ParallelVaeDecoder(None, None, 0, 1, engine=pieces)  # one rank: a layout the pieces do not have
    with pytest.raises(ValueError, match=r"built for latents \[1, 4, 16, 12\], rows \[0, 6\]"):
        decoder.decode(torch.zeros(*LATENTS))
