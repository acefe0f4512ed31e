"""A tiny Llama-shaped causal LM for the Python tests (no transformers needed).

Hugging Face names (`model.layers.N.self_attn.q_proj`, `mlp.gate_proj`, ...), q/k/v with bias,
grouped k/v heads, causal attention honouring an attention mask, a toy MoE block option. Saved
as a checkpoint folder (config.json + bf16 model.safetensors) that `nvfp4cal quantize` reads;
`load` is a `calibrate --model-loader` function.
"""

import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python"))
from nvfp4cal.hessians_file import RawTensor, read_safetensors, write_safetensors  # noqa: E402

CONFIG = {"architectures": ["TinyLlama"], "model_type": "tiny", "vocab_size": 256,
          "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


class Attention(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        self.heads, self.kv, self.dim = heads, kv, h // heads
        self.q_proj = torch.nn.Linear(h, h, bias=True)
        self.k_proj = torch.nn.Linear(h, kv * self.dim, bias=True)
        self.v_proj = torch.nn.Linear(h, kv * self.dim, bias=True)
        self.o_proj = torch.nn.Linear(h, h, bias=False)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.kv, self.dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv, self.dim).transpose(1, 2)
        rep = self.heads // self.kv
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = (q @ k.transpose(-1, -2)).float() / self.dim ** 0.5
        allowed = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if mask is not None:
            allowed = allowed & mask.bool()[:, None, None, :]
        scores = scores.masked_fill(~allowed, -1e9)
        out = (scores.softmax(-1).to(v.dtype) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


class Mlp(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        h, i = c["hidden_size"], c["intermediate_size"]
        self.gate_proj = torch.nn.Linear(h, i, bias=False)
        self.up_proj = torch.nn.Linear(h, i, bias=False)
        self.down_proj = torch.nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = torch.nn.LayerNorm(c["hidden_size"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = torch.nn.LayerNorm(c["hidden_size"])
        self.mlp = Mlp(c)

    def forward(self, x, mask):
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Inner(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = torch.nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))
        self.norm = torch.nn.LayerNorm(c["hidden_size"])


class TinyLlama(torch.nn.Module):
    def __init__(self, config=None):
        super().__init__()
        self.config = dict(config or CONFIG)
        self.model = Inner(self.config)
        self.lm_head = torch.nn.Linear(self.config["hidden_size"], self.config["vocab_size"],
                                       bias=False)

    def forward(self, input_ids, attention_mask=None):
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x, attention_mask)
        return self.lm_head(self.model.norm(x))


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = TinyLlama()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                p.mul_(3.0)  # weights of a trained model's magnitude
    return model.to(dtype).eval()


def _bf16_bits(t):
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def save_checkpoint(model, folder):
    """config.json + model.safetensors (bf16 weights; norms and biases too)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(model.config, f)
    tensors = {name: RawTensor("BF16", tuple(p.shape), _bf16_bits(p))
               for name, p in model.state_dict().items()}
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)


def load(model_dir, dtype, device):
    """calibrate --model-loader tiny_model:load: the checkpoint's model, in `dtype`."""
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    model = TinyLlama(config)
    tensors, _ = read_safetensors(os.path.join(model_dir, "model.safetensors"))
    state = {}
    for name, raw in tensors.items():
        bits = torch.from_numpy(raw.data.view(np.int16).copy())
        state[name] = bits.view(torch.bfloat16).to(torch.float32)
    model.load_state_dict(state)
    return model.to(device=device, dtype=dtype).eval()


def load_without_linear(model_dir, dtype, device):
    """A model with no torch.nn.Linear at all (for the error test)."""
    class NoLinear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(256, 16)

        def forward(self, input_ids, attention_mask=None):
            return self.embed(input_ids)
    return NoLinear().to(device)
