"""QLoRA's base quantized on the GPU as the model is built: where the NF4 weights end up, and how
they compare with the CPU's quantization of the same weights. Skipped without CUDA."""

import pytest
import torch

from finetune import ao
from finetune.models import build_model
from finetune.models.lora import adapter_params, nf4_base_modules
from finetune.training.model_setup import build_on_cpu
from tests.lora.test_qlora_setup import ARGS, adapt, seeded_initialize

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_base_quantized_on_the_gpu_agrees_with_the_cpu(use_dora):
    torch.manual_seed(0)
    base = {k: v.to(torch.bfloat16) for k, v in build_model(ARGS).state_dict().items()}
    on_cpu = build_on_cpu(ARGS, dict(base), adapt=adapt(use_dora), initialize=seeded_initialize)
    on_gpu = build_on_cpu(
        ARGS, dict(base), adapt=adapt(use_dora), initialize=seeded_initialize, quantize_on=torch.device("cuda")
    )
    reference = nf4_base_modules(on_cpu)
    for name, module in nf4_base_modules(on_gpu).items():
        assert ao.is_nf4(module.weight) and module.weight.device.type == "cuda", name
        got = ao.nf4_dequantize(module.weight).float().cpu()
        want = ao.nf4_dequantize(reference[name].weight).float()
        # The same codes; the double-quantized block scales may round differently (a mean over
        # the scales is reduced in another order on the GPU).
        assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < 1e-2, name
    # Adapters are drawn on the CPU whatever the device, then sit beside their base.
    cpu_adapters = adapter_params(on_cpu)
    for name, param in adapter_params(on_gpu).items():
        assert param.device.type == "cuda", name
        if "lora_" in name:
            assert torch.equal(param.cpu(), cpu_adapters[name]), name
