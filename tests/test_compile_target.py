"""The 7B job compiled by the real TPU compiler for a v5e-8 slice (libtpu on this CPU, no TPU):
at LLaVA-1.5-7B widths with 2 decoder and 2 vision layers, every phase does the per-device work
and holds the per-device memory that the batch-sharded ideal does (within 20%)."""
import json
import pathlib
import sys

import pytest

from fisao_jax import compile_target as ct

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not ct.libtpu_available(), reason='libtpu is not installed '
                                 '(pip install "jax[tpu]==<jax version>"); .ci/run installs it')]


def test_7b_width_phases_are_batch_sharded_on_v5e_8(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    import aot_compile

    out = tmp_path / "v5e-8.json"
    rc = aot_compile.main(["--config", str(ROOT / "configs" / "llava7b.py"), "--topology", "v5e-8", "--layers", "2",
                           "--vision_layers", "2", "--json", str(out)])
    assert rc == 0  # fits
    result = json.loads(out.read_text())
    assert result["mesh"]["fsdp"] == -1 and result["batch"] == 64  # the config's FSDP mesh and batch
    assert set(result["phases"]) == {"rollout", "scoring", "update"}
    for name, p in result["phases"].items():
        assert p["flops_per_device"] > 1e11, name  # 7B-wide layers over a 64-prompt batch
        assert p["flops_per_device"] <= 1.2 * p["ideal_flops_per_device"], (name, p)
        assert p["temp_bytes"] <= 1.2 * p["ideal_temp_bytes"], (name, p)
        assert p["fits"] and p["peak_bytes"] < 16 * 2**30


def test_unknown_topology_and_missing_pieces_are_clear_errors(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import aot_compile

    assert aot_compile.main(["--topology", "v9-8"]) == 2
    assert "--topology must be one of" in capsys.readouterr().err
    assert aot_compile.main(["--topology", "v5e-8", "--mesh", "model=8"]) == 2
    assert "--mesh: bad entry 'model=8'" in capsys.readouterr().err


def test_7b_width_update_compiles_for_a_4_host_v5e_16(tmp_path):
    """Past one host: the multi-host topology (4 hosts x 4 chips, one 16-device mesh)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import aot_compile

    assert ct.TARGETS["v5e-16"].hosts == 4
    out = tmp_path / "v5e-16.json"
    rc = aot_compile.main(["--topology", "v5e-16", "--layers", "2", "--vision_layers", "2", "--phases", "update",
                           "--json", str(out)])
    assert rc == 0
    p = json.loads(out.read_text())["phases"]["update"]
    assert p["flops_per_device"] <= 1.2 * p["ideal_flops_per_device"]
    assert p["temp_bytes"] <= 1.2 * p["ideal_temp_bytes"]
