"""On a GPU device (Metal, CUDA) nothing measured only on the CPU may run: every CPU-specific
path answers "no" and a rollout takes mlx-lm's ``BatchGenerator``.

These machines have no GPU, so the device MLX reports is stood in for at the Python level
(``mx.default_device``); the arrays themselves still compute on the CPU.
"""

import mlx.core as mx
import pytest

from mlx_reasoner import rollout
from mlx_reasoner.engine import compiled_decode, cpu_math, fused_decode, streams
from mlx_reasoner.model import attach_lora, lora_config, parameter_count


@pytest.fixture
def on_gpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))


def test_the_cpu_paths_are_on_here():
    # The gates below can only be shown to close if they are open on this CPU machine.
    assert fused_decode.fused_decode_apply()
    assert compiled_decode.compiled_decode_default()
    assert streams.row_streams() >= 1


def test_no_cpu_path_is_chosen_on_a_gpu(on_gpu):
    assert not fused_decode.fused_decode_apply()
    assert not compiled_decode.compiled_decode_default()
    assert not cpu_math.fast_activations_apply()
    assert not cpu_math.small_weights_apply()
    assert streams.row_streams() == 1


def test_a_rollout_on_a_gpu_takes_mlx_lms_batch_generator(tiny_model, on_gpu):
    model, tokenizer = tiny_model
    attach_lora(model, lora_config(-1, 4))
    prompt = tokenizer.encode("How many r are in strawberry?")
    rollouts = rollout.generate_groups(model, tokenizer, [prompt], 2, 4)
    assert rollouts.decoder == "BatchGenerator"
    with cpu_math.shared_rope(model):
        assert not any(type(m).__name__ == "SharedRoPE" for _, m in model.named_modules())


def test_the_training_pass_is_compiled_for_small_models_on_the_cpu(tiny_model, monkeypatch):
    from mlx_reasoner import trainer

    model, _ = tiny_model
    count = parameter_count(model)
    assert trainer.compile_training_pass(count)
    monkeypatch.setattr(trainer, "COMPILE_MAX_PARAMETERS", 1000)  # as if the model were large
    assert not trainer.compile_training_pass(count)
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert trainer.compile_training_pass(count)  # off the CPU, as mlx-lm's trainer does
