"""Adaptive per-token depth (issue 22): exit rules, the worker's decode against a token-by-token reference,
the update's per-token-depth recomputation, the compute saving, and the config keys' refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from looped import OuroConfig, OuroForCausalLM
from looped.fast_decode import OuroDecodeStep
from looped.modeling_ouro import exit_probs_from_lambdas, threshold_exit_index
from rl.batch import Sample, collate
from rl.data import EMBEDDED_MODEL
from rl.losses import token_logprobs
from rl.policy import position_depths
from rollout import ExitRule, SamplingParams, make_worker
from rollout.exit_rules import ExitDecider, decide_from_exits

torch.set_num_threads(1)


def embedded():
    return OuroForCausalLM.from_pretrained(str(EMBEDDED_MODEL), dtype=torch.float32).eval()


def gqa_t3():
    """A random GQA config with another T (3 loops, 4 query heads on 2 K/V heads, 3 layers)."""
    torch.manual_seed(1)
    config = OuroConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, total_ut_steps=3, max_position_embeddings=128,
                        eos_token_id=2, pad_token_id=0, bos_token_id=1, initializer_range=0.2)
    return OuroForCausalLM(config).eval()


MODELS = {"embedded": embedded, "gqa_t3": gqa_t3}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # different lengths: left padding


def between(values: torch.Tensor) -> float:
    """Halfway between the two middle values: a threshold no value sits on (no rounding can flip a decision)."""
    v = values.flatten().sort().values
    return float(v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


def mid_threshold(model, prompts=PROMPTS) -> float:
    """A confidence threshold at the median exit max-probability, so rows stop at different loops."""
    with torch.no_grad():
        out = model(torch.tensor([prompts[0]]), output_exits=True, use_cache=False)
        probs = torch.cat([model.lm_head(h[0]).softmax(-1).amax(-1) for h in out.exit_hidden_states[:-1]])
    return between(probs)


def mid_gate(model, prompts=PROMPTS) -> float:
    """A gate level q at the median exit CDF of loops 1..T-1, so rows stop at different loops."""
    with torch.no_grad():
        probs = model(torch.tensor([prompts[0]]), output_exits=True, use_cache=False).exit_probs[0]
    return between(probs.cumsum(-1)[:, :-1])


def reference_decode(model, prompt, rule: ExitRule, max_new: int, stop: set[int]):
    """The rule applied token by token through the model's own (non-fused, unbatched, cache-free) forward:
    each step scores the whole sequence with the recorded per-position depths (the K/V rule) and all T exits
    of the last position, picks the exit independently of rollout/exit_rules.py, and takes its argmax."""
    T = model.config.total_ut_steps
    seq, pos_depth, tokens, depths = list(prompt), [T] * len(prompt), [], []
    for _ in range(max_new):
        with torch.no_grad():
            out = model(torch.tensor([seq]), exit_depth=torch.tensor([pos_depth]), output_exits=True,
                        use_cache=False)
        exits = [h[0, -1] for h in out.exit_hidden_states]
        if rule.kind == "confidence":
            ok = [t >= rule.min_depth and float(model.lm_head(exits[t - 1]).detach().softmax(-1).max()) >= rule.threshold
                  for t in range(1, T + 1)]
            d = next((t for t in range(1, T + 1) if ok[t - 1]), T)
        else:  # the model's own exit distribution at the last position; its CDF is monotone, so min_depth clamps
            d = max(int(threshold_exit_index(out.exit_probs[0, -1], rule.threshold)) + 1, rule.min_depth)
        token = int(model.lm_head(exits[d - 1]).argmax())
        pos_depth[-1] = d
        seq.append(token)
        pos_depth.append(T)
        tokens.append(token)
        depths.append(d)
        if token in stop:
            break
    return tokens, depths


# ----------------------------------------------------------------------------- the rules on hand-made inputs


def test_confidence_rule_threshold_min_depth_and_temperature():
    # lm_head = identity: the hidden states ARE the logits. Row 0 is confident at loop 1, row 1 only at loop 3,
    # row 2 never (runs to T = 4).
    sure, flat = torch.tensor([8.0, 0.0, 0.0]), torch.zeros(3)
    exits = [torch.stack([sure, flat, flat]), torch.stack([sure, flat, flat]), torch.stack([sure, sure, flat]),
             torch.stack([flat, flat, flat])]

    def run(rule, temperature=1.0):
        decider = ExitDecider(rule, 4, temperature, lambda h: h, None, 3, torch.device("cpu"))
        decide_from_exits(decider, exits)
        return decider.depth.tolist(), decider.logits

    depths, logits = run(ExitRule("confidence", 0.9))
    assert depths == [1, 3, 4]
    assert torch.equal(logits, torch.stack([sure, sure, flat]))  # each row's chosen exit
    assert run(ExitRule("confidence", 0.9, min_depth=2))[0] == [2, 3, 4]
    # max prob of `sure` = e^8 / (e^8 + 2) = 0.99933: at temperature 4 it is 0.88 < 0.9 (never confident)
    assert run(ExitRule("confidence", 0.9), temperature=4.0)[0] == [4, 4, 4]
    assert run(ExitRule("confidence", 0.9), temperature=0.0)[0] == [1, 3, 4]  # greedy: plain softmax
    assert run(ExitRule("confidence", 0.9995))[0] == [4, 4, 4]


def test_gate_rule_is_the_models_exit_cdf():
    torch.manual_seed(0)
    gate_logits = torch.randn(64, 4) * 2
    exits = [gate_logits[:, t:t + 1] for t in range(4)]  # the hidden state carries its gate logit
    seen = set()
    for q in (0.0, 0.3, 0.5, 0.8, 0.99, 1.0):
        for min_depth in (1, 2):
            decider = ExitDecider(ExitRule("gate", q, min_depth), 4, 1.0, lambda h: h, lambda h: h[:, 0], 64,
                                  torch.device("cpu"))
            decide_from_exits(decider, exits)
            expected = threshold_exit_index(exit_probs_from_lambdas(torch.sigmoid(gate_logits)), q) + 1
            assert torch.equal(decider.depth, expected.clamp(min=min_depth)), (q, min_depth)
            seen |= set(decider.depth.tolist())
    assert seen == {1, 2, 3, 4}
    assert set(decider.depth.tolist()) == {4}  # q = 1: always T


# ----------------------------------------------------------------------------- decode vs reference


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("kind", ["confidence", "gate"])
def test_greedy_adaptive_decode_equals_token_by_token_reference(name, fast, kind):
    model = MODELS[name]()
    T = model.config.total_ut_steps
    rule = ExitRule("confidence", mid_threshold(model)) if kind == "confidence" else ExitRule("gate", mid_gate(model))
    worker = make_worker("torch", depth=T, model=model, pad_token_id=0, fast_decode=fast)
    assert worker.uses_fast_decode == fast
    # a stop token that some rows draw early and others never: rows end at different steps
    free = worker.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, temperature=0, exit_rule=rule,
                                                   stop_token_ids=[]))
    stop = max({t for c in free.completion_ids for t in c},
               key=lambda t: len({c.index(t) if t in c else -1 for c in free.completion_ids}))
    got = worker.generate(PROMPTS, SamplingParams(n=2, max_new_tokens=10, temperature=0, exit_rule=rule,
                                                  stop_token_ids=[stop]))
    lengths = {len(c) for c in got.completion_ids}
    assert len(lengths) > 1, "rows must stop at different steps"
    all_depths = {d for row in got.token_depths for d in row}
    assert len(all_depths) > 1 and all(1 <= d <= T for d in all_depths)
    for row, prompt in enumerate(p for p in PROMPTS for _ in range(2)):
        tokens, depths = reference_decode(model, prompt, rule, 10, {stop})
        assert got.completion_ids[row] == tokens, row
        assert got.token_depths[row] == depths, row


def test_fixed_rule_is_plain_decoding():
    model = embedded()
    worker = make_worker("torch", depth=4, model=model, pad_token_id=0)
    params = dict(n=2, max_new_tokens=8, temperature=1.0, seed=3)
    plain = worker.generate(PROMPTS, SamplingParams(**params))
    fixed = worker.generate(PROMPTS, SamplingParams(**params, exit_rule=ExitRule("fixed")))
    assert plain.completion_ids == fixed.completion_ids and plain.logprobs == fixed.logprobs
    assert plain.token_depths is None and fixed.token_depths is None
    # confidence threshold ~0: every token at depth 1, exactly the fixed depth-1 worker (same K/V at loop 1)
    one = make_worker("torch", depth=1, model=model, pad_token_id=0).generate(PROMPTS, SamplingParams(**params))
    early = worker.generate(PROMPTS, SamplingParams(**params, exit_rule=ExitRule("confidence", 1e-9)))
    assert early.completion_ids == one.completion_ids and early.logprobs == one.logprobs
    assert {d for row in early.token_depths for d in row} == {1}


# ----------------------------------------------------------------------------- the update reproduces it


def update_logprobs(model, rollout, matched: bool = True, micro: int = 4):
    """What rl/policy.py computes: collated micro-batches, one forward at per-position depths."""
    T = model.config.total_ut_steps
    samples = [Sample(0, rollout.prompt_ids[i], rollout.completion_ids[i], rollout.logprobs[i], False, 0.0, {},
                      None, "", token_depths=rollout.token_depths[i]) for i in range(len(rollout))]
    worst = 0.0
    for start in range(0, len(samples), micro):
        batch = collate(samples[start:start + micro], 0, mask_truncated=False)
        ids, attn, p_len = batch["input_ids"], batch["attention_mask"], batch["prompt_len"]
        c_len = ids.shape[1] - p_len
        kwargs = {"exit_depth": position_depths(batch["token_depths"], ids.shape[1], p_len, T)} if matched else {}
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                        use_cache=False, logits_to_keep=c_len + 1, depth=T, **kwargs)
        logp, _ = token_logprobs(out.logits[:, -(c_len + 1):-1], ids[:, p_len:], 1.0)
        mask = torch.arange(c_len)[None] < batch["real_len"][:, None]
        worst = max(worst, float(((logp - batch["rollout_logprobs"]).abs() * mask).max()))
    return worst


@pytest.mark.parametrize("fast", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", list(MODELS))
def test_sampled_logprobs_equal_the_updates_per_token_depth_recomputation(name, fast):
    model = MODELS[name]()
    T = model.config.total_ut_steps
    worker = make_worker("torch", depth=T, model=model, pad_token_id=0, fast_decode=fast)
    rule = ExitRule("confidence", mid_threshold(model), min_depth=1)
    rollout = worker.generate(PROMPTS, SamplingParams(n=3, max_new_tokens=12, temperature=1.0, seed=5,
                                                      exit_rule=rule))
    assert len({d for row in rollout.token_depths for d in row}) > 1
    assert update_logprobs(model, rollout) <= 1e-5
    # scoring the same tokens at fixed T (the allow_depth_mismatch arm) is a different policy
    assert update_logprobs(model, rollout, matched=False) > 1e-3


# ----------------------------------------------------------------------------- the compute saving


def test_rows_that_stop_early_skip_their_deeper_loops():
    """Rows x layer applications, counted at every layer's down projection: prefill runs T loops per prompt
    position, and each decode step runs exactly the depth its row stopped at."""
    model = embedded()
    L, T = model.config.num_hidden_layers, model.config.total_ut_steps
    inter = model.config.intermediate_size
    rows = [0]
    hooks = [layer.mlp.down_proj.register_forward_hook(lambda m, i, o: rows.__setitem__(0, rows[0] + i[0].numel()
                                                                                         // inter))
             for layer in model.model.layers]
    worker = make_worker("torch", depth=T, model=model, pad_token_id=0)
    worker.generate(PROMPTS, SamplingParams(max_new_tokens=2, stop_token_ids=[]))  # verify the fused step first
    width, max_new, n = max(len(p) for p in PROMPTS), 9, 2
    prefill = L * T * len(PROMPTS) * width

    rows[0] = 0
    worker.generate(PROMPTS, SamplingParams(n=n, max_new_tokens=max_new, temperature=0, stop_token_ids=[]))
    fixed = rows[0]
    assert fixed == prefill + L * T * len(PROMPTS) * n * (max_new - 1)

    rule = ExitRule("confidence", mid_threshold(model))
    params = SamplingParams(n=n, max_new_tokens=max_new, temperature=0, stop_token_ids=[], exit_rule=rule)
    worker._fast.shrink_below = 1.0  # computed rows = running rows from the first stop on: exact accounting
    rows[0] = 0
    got = worker.generate(PROMPTS, params)
    exact = rows[0]
    worker._fast.shrink_below = OuroDecodeStep.shrink_below  # the default: shrink once half the rows stopped
    rows[0] = 0
    again = worker.generate(PROMPTS, params)
    lazy = rows[0]
    for h in hooks:
        h.remove()
    # the token fed at step k (k = 0..max_new-2) sits at the position that produced token k + 1
    assert exact == prefill + L * sum(sum(d[1:]) for d in got.token_depths)
    assert exact < lazy < fixed
    assert again.completion_ids == got.completion_ids and again.token_depths == got.token_depths


# ----------------------------------------------------------------------------- the config keys


def run_cli(tmp_path, *args):
    proc = subprocess.run([sys.executable, "-m", "rl", *args], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1",
                                             "OMP_NUM_THREADS": "1"})
    return proc.returncode, proc.stderr.strip().splitlines()


@pytest.mark.parametrize("args, key, words", [
    (["--rollout_exit_rule", "confidence"], "rollout_exit_threshold", "needs a number"),
    (["--rollout_exit_rule", "confidence", "--rollout_exit_threshold", "1.5"], "rollout_exit_threshold", "(0, 1]"),
    (["--rollout_exit_threshold", "0.5"], "rollout_exit_threshold", "the rule is fixed"),
    (["--rollout_exit_rule", "depthy"], "rollout_exit_rule", "not one of"),
    (["--rollout_exit_rule", "gate", "--rollout_exit_threshold", "0.5", "--engine", "vllm"], "rollout_exit_rule",
     "needs engine torch"),
    (["--rollout_exit_rule", "gate", "--rollout_exit_threshold", "0.5", "--rollout_draft_depth", "2",
      "--rollout_num_draft", "2"], "rollout_exit_rule", "speculative"),
    (["--rollout_exit_rule", "gate", "--rollout_exit_threshold", "0.5", "--rollout_min_depth", "9"],
     "rollout_min_depth", "exceeds the rollout depth 4"),
    (["--allow_depth_mismatch", "true"], "allow_depth_mismatch", "does nothing here"),  # a key that would be ignored
])
def test_train_refuses_bad_exit_rule_keys_in_one_line(tmp_path, args, key, words):
    code, err = run_cli(tmp_path, "train", "--output_dir", str(tmp_path / "run"), "--max_steps", "1",
                        "--progress", "false", *args)
    assert code == 2 and len(err) == 1, err
    assert f"config key '{key}'" in err[0] and words in err[0], err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_eval_refuses_bad_exit_rule_keys_in_one_line(tmp_path):
    code, err = run_cli(tmp_path, "eval", "--data", "arith", "--limit", "2", "--rollout_exit_rule", "gate",
                        "--rollout_exit_threshold", "-0.5")
    assert code == 2 and len(err) == 1 and "config key 'rollout_exit_threshold'" in err[0], err


def test_eval_reports_accuracy_and_mean_depth_for_the_rule(tmp_path):
    out = tmp_path / "eval.json"
    code, err = run_cli(tmp_path, "eval", "--data", "arith", "--limit", "6", "--depths", "4", "--max_new_tokens",
                        "8", "--rollout_exit_rule", "confidence", "--rollout_exit_threshold", "0.6", "--out",
                        str(out), "--no_progress")
    assert code == 0, err
    rule = json.loads(out.read_text())["exit_rule"]
    assert rule["exit_rule"] == "confidence" and rule["exit_threshold"] == 0.6
    assert 1.0 <= rule["depth_mean"] < 4.0 and 0.0 <= rule["accuracy"] <= 1.0


def test_train_step_scores_every_token_at_its_depth(tmp_path):
    """The default job with an adaptive rule: the update recomputes the rollout's logprobs (mismatch ~1e-6);
    with allow_depth_mismatch the same rollouts are scored at T (the mismatch is the policy difference)."""
    common = ["train", "--max_steps", "1", "--prompts_per_step", "4", "--eval_every", "0", "--progress", "false",
              "--rollout_exit_rule", "confidence", "--rollout_exit_threshold", "0.6"]
    results = {}
    for arm, extra in (("matched", []), ("mismatch", ["--allow_depth_mismatch", "true"])):
        code, err = run_cli(tmp_path, *common, "--output_dir", str(tmp_path / arm), *extra)
        assert code == 0, err[-5:]
        results[arm] = json.loads((tmp_path / arm / "metrics.jsonl").read_text().splitlines()[0])
    m = results["matched"]
    assert m["mismatch/logp_abs_max"] <= 1e-4 and 1.0 <= m["rollout/mean_depth"] < 4.0
    assert sum(m[f"rollout/depth_frac_t{t}"] for t in range(1, 5)) == pytest.approx(1.0)
    assert results["mismatch"]["mismatch/logp_abs_max"] > 1e-2


def test_plot_draws_the_mean_depth():
    from rl.plot import PANELS

    picks = [p.select(["rollout/mean_depth", "rollout/depth_frac_t1"]) for p in PANELS]
    assert [("mean depth", "rollout/mean_depth")] in picks
