"""Config loading: presets, overrides, and validation of every bad case before any work."""
import pytest

from lgd.config import Config, load_config
from lgd.errors import ConfigError


def test_presets_load_and_overrides_apply():
    demo = load_config("demo", ["stages.ipc=20", "lgd.window=[5, 20]", "sampling.cfg_channels=3"])
    assert demo.stages.ipc == 20 and demo.lgd.window == (5, 20) and demo.sampling.cfg_channels == 3
    assert demo.lgd.stage_model.network == "convnet3"
    assert isinstance(demo.to_dict()["lgd"]["window"], list)
    for preset in ("nette", "woof"):
        with pytest.raises(ConfigError, match="model.dit is required"):
            load_config(preset)


def test_defaults_follow_the_method():
    c = Config()
    assert (c.lgd.omega, c.lgd.lam, c.lgd.gamma, c.lgd.kappa, c.lgd.window) == (0.5, 15.0, 50.0, 3, (10, 45))
    assert (c.igd.k, c.igd.gamma, c.igd.window, c.igd.checkpoints, c.igd.cos_threshold) == (5.0, 120.0, (30, 45), 4, 0.7)
    assert (c.sampling.steps, c.sampling.cfg_scale, c.stages.increment) == (50, 4.0, 10)


def test_yaml_file_with_preset_base(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("preset: demo\nstages: {ipc: 4}\n")
    assert load_config(path).stages.ipc == 4 and load_config(path).stages.increment == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("stages.ipc=9", "multiple of stages.increment"),
        ("stages.increment=0", "stages.increment"),
        ("stages.initial=gan", "stages.initial"),
        ("lgd.window=[10, 50]", "lgd.window"),
        ("lgd.window=[30, 20]", "lgd.window"),
        ("igd.window=[-1, 20]", "igd.window"),
        ("lgd.omega=-0.1", "lgd.omega"),
        ("lgd.lam=-1", "lgd.lam"),
        ("lgd.gamma=-1", "lgd.gamma"),
        ("lgd.kappa=0", "lgd.kappa"),
        ("lgd.memory=0", "lgd.memory"),
        ("igd.cos_threshold=2", "igd.cos_threshold"),
        ("sampling.steps=1", "sampling.steps"),
        ("sampling.cfg_scale=0.5", "sampling.cfg_scale"),
        ("sampling.method=euler", "sampling.method"),
        ("sampling.engine=turbo", "sampling.engine"),
        ("sampling.round_slots=0", "sampling.round_slots must be at least 1"),
        ("sampling.precision=fp8", "sampling.precision must be one of auto, fp32, bf16, fp16"),
        ("eval.runs=0", "eval.runs"),
        ("eval.baselines=[gan]", "eval.baselines"),
        ("lgd.stage_model.recipe=adam", "lgd.stage_model.recipe"),
        ("lgd.stage_model.network=vgg", "vgg"),
        ("eval.networks=[convnet3, vgg]", "vgg"),
        ("data.name=cifar", "cifar"),
        ("data.name=imagenette", "data.root is required"),
        ("device=tpu", "device"),
        ("lgd.nonsense=1", "unknown config key"),
        ("stages.ipc=ten", "stages.ipc must be int"),
        ("noequals", "section.key=value"),
    ],
)
def test_each_bad_value_is_rejected_with_a_clear_message(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_config("demo", [override])


def test_validation_is_pure_files_are_checked_where_they_are_opened(tmp_path):
    """validate checks values only: a config naming files that are not on this machine loads
    (lgd distill's loaders name them before anything is written, see test_cli.py), and a run
    directory is evaluated with its own model paths, not ones forced to exist."""
    from lgd.assessment import load_run_config
    from lgd.resume import claim
    from lgd.rundir import RunDir

    missing = ["model.dit=/no/such/file.pt", "model.vae=/no/such/vae", "data.name=imagefolder",
               "data.root=/no/such/folder"]
    config = load_config("demo", missing)
    assert (config.model.dit, config.data.root) == ("/no/such/file.pt", "/no/such/folder")
    claim(RunDir(tmp_path), config)
    assert load_run_config(tmp_path).model.dit == "/no/such/file.pt"


def test_unknown_preset_or_file():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config("nonsense")


def test_gpu_switches_are_validated():
    assert load_config("demo").model.attention == "sdpa"
    with pytest.raises(ConfigError, match="model.attention must be one of sdpa, math, xformers"):
        load_config("demo", ["model.attention=flash"])
    with pytest.raises(ConfigError, match="cannot be combined with sampling.compile=true"):
        load_config("demo", ["model.attention=xformers", "sampling.compile=true"])
    try:
        import xformers  # noqa: F401  (only whether it imports)
    except ImportError:
        with pytest.raises(ConfigError, match="model.attention=xformers needs the xformers package"):
            load_config("demo", ["model.attention=xformers"])
    with pytest.raises(ConfigError, match="distributed_timeout must be positive"):
        load_config("demo", ["distributed_timeout=0"])
    assert load_config("demo", ["sampling.tf32=false"]).sampling.tf32 is False


def test_attention_field_reaches_the_dit(tmp_path):
    from lgd.pipeline import load_generator

    config = load_config("demo", ["model.attention=math"])
    assert load_generator(config, "cpu").dit.attention_backend == "math"


def test_renamed_keys_are_read_under_their_new_name():
    """stages.seed (the initial increment's method, easily taken for the integer seed) is now
    stages.initial; config files and run directories written with the old name still load."""
    assert load_config("demo", ["stages.seed=dit"]).stages.initial == "dit"
    assert Config.from_dict({"stages": {"seed": "random"}}).stages.initial == "random"
    with pytest.raises(ConfigError, match="stages.initial must be igd, dit or random"):
        load_config("demo", ["stages.seed=gan"])
