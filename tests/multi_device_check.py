"""Run in a subprocess with 4 host devices (XLA_FLAGS must be set before jax starts).

Checks tensor-parallel sharding and num_device_layers placement on a tiny random
Llama; prints "OK <what>" per check, raises on any mismatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mrs.models.layers import init_cache
from mrs.models.llama import LlamaForCausalLM, config_from_hf
from mrs.models.params import nest
from mrs.quant import QArray, quantize_params
from mrs.sharding.device_map import device_map, layer_key, place_cache, place_params
from mrs.sharding.tensor_parallel import make_mesh, shard_cache, shard_params

HF = dict(model_type="llama", vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)


def random_params(config, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    h, kv, i = config.hidden_size, config.num_kv_heads * config.head_dim, config.intermediate_size

    def mat(o: int, n: int) -> np.ndarray:
        return (rng.standard_normal((o, n)) * 0.1).astype(np.float32)

    named = [("model.embed_tokens.weight", mat(config.vocab_size, h)), ("model.norm.weight", np.ones(h, np.float32)),
             ("lm_head.weight", mat(config.vocab_size, h))]
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        named += [(prefix + "input_layernorm.weight", np.ones(h, np.float32)),
                  (prefix + "post_attention_layernorm.weight", np.ones(h, np.float32)),
                  (prefix + "self_attn.q_proj.weight", mat(h, h)), (prefix + "self_attn.k_proj.weight", mat(kv, h)),
                  (prefix + "self_attn.v_proj.weight", mat(kv, h)), (prefix + "self_attn.o_proj.weight", mat(h, h)),
                  (prefix + "mlp.gate_proj.weight", mat(i, h)), (prefix + "mlp.up_proj.weight", mat(i, h)),
                  (prefix + "mlp.down_proj.weight", mat(h, i))]
    return nest((name, jnp.asarray(value)) for name, value in named)


def main() -> None:
    assert len(jax.devices()) == 4, jax.devices()
    config = config_from_hf(HF)
    model = LlamaForCausalLM(config)
    tokens = jnp.asarray([[3, 17, 99, 5, 42, 7], [1, 2, 3, 4, 5, 6]], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(6, dtype=jnp.int32), (2, 6))
    run = jax.jit(lambda p, c: model.apply({"params": p}, tokens, positions, c))

    for label, params in (("float32", random_params(config)), ("Q8_0", None)):
        if params is None:
            params = quantize_params(random_params(config), "Q8_0")
        want, _ = run(params, init_cache(config, 2, 8))
        for n in (2, 4):
            mesh = make_mesh(n)
            sharded = shard_params(params, mesh)
            q = sharded["model"]["layers_1"]["self_attn"]["q_proj"]["weight"]
            o = sharded["model"]["layers_1"]["self_attn"]["o_proj"]["weight"]
            q_arr, o_arr = (q.data, o.data) if isinstance(q, QArray) else (q, o)
            assert q_arr.sharding.spec[0] == "tp" and len(q_arr.sharding.device_set) == n, q_arr.sharding
            assert o_arr.sharding.spec[1] == "tp", o_arr.sharding
            # each device holds 1/n of the column-parallel weight
            assert {s.data.shape[0] for s in q_arr.addressable_shards} == {q_arr.shape[0] // n}
            cache = shard_cache(init_cache(config, 2, 8), mesh)
            got, new_cache = run(sharded, cache)
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
            assert np.array_equal(np.argmax(got, -1), np.argmax(want, -1))
            assert len(new_cache[0][0].sharding.device_set) == n
            print(f"OK tensor_parallel={n} {label}", flush=True)

    params = random_params(config)
    devices = jax.devices()
    for spec, expected in ((["0:1;1:2;3:1"], [0, 1, 1, 3]), (["2"], [0, 0, "host", "host"]), (None, [0, 0, 0, 0])):
        dmap = device_map(spec, config.num_layers)
        want_devices = [jax.devices("cpu")[0] if e == "host" else devices[e] for e in expected]
        assert list(dmap.layers) == want_devices, (spec, dmap.layers)
        placed = place_params(params, dmap)
        for layer, device in enumerate(want_devices):
            root, name = layer_key(placed, layer)
            for leaf in jax.tree_util.tree_leaves(placed[root][name]):
                assert leaf.devices() == {device}, (spec, layer, leaf.devices())
        assert placed["model"]["embed_tokens"]["weight"].devices() == {want_devices[0]}
        for (k, v), device in zip(place_cache(init_cache(config, 1, 8), dmap), want_devices):
            assert k.devices() == v.devices() == {device}
        print(f"OK num_device_layers={spec}", flush=True)


if __name__ == "__main__":
    main()
