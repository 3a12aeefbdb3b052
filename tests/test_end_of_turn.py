"""The end-of-turn token comes from the chat template, not from tokenizer.eos_token.

Tokenizers are built here (byte-level BPE trained on a few sentences) and carry the public chat templates of
four model families, with their real special tokens and eos settings.
"""

import re

import pyarrow as pa
import pytest
import torch

from rayalign.models import encode_response, end_of_turn_ids, stop_token_ids
from rayalign.training.data import collate, encode_dataset

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# family: (template, bos, eos, the template's end-of-turn token, other special tokens); Llama-3 base/SFT and
# Qwen2.5 base checkpoints have an eos that the template never writes after an assistant turn
FAMILIES = {
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", ["<|start_header_id|>",
                                                                             "<|end_header_id|>"]),
    "qwen2.5": (QWEN25, None, "<|endoftext|>", "<|im_end|>", ["<|im_start|>"]),
    "gemma2": (GEMMA2, "<bos>", "<eos>", "<end_of_turn>", ["<start_of_turn>", "<pad>"]),
    "mistral": (MISTRAL, "<s>", "</s>", "</s>", []),
}
QUESTION, ANSWER = "What is the capital of France?", "Paris is the capital."


def family_tokenizer(name: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    template, bos, eos, eot, others = FAMILIES[name]
    specials = list(dict.fromkeys([t for t in (bos, eos, eot) if t] + others))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([QUESTION, ANSWER, "system user assistant model [INST] [/INST] You are Qwen"], trainer)
    extra = [t for t in specials if t not in (bos, eos)]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos,
                                   additional_special_tokens=extra, chat_template=template)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_end_of_turn_token_and_scoring_offsets_follow_the_template(family):
    tok = family_tokenizer(family)
    eot_id = tok.convert_tokens_to_ids(FAMILIES[family][3])
    assert end_of_turn_ids(tok) == [eot_id]
    messages = [{"role": "user", "content": QUESTION}]
    prompt, response = encode_response(tok, messages, ANSWER)
    # the scored sequence is exactly the start of the template's own rendering of the finished conversation
    full = tok.apply_chat_template(messages + [{"role": "assistant", "content": ANSWER}], tokenize=True,
                                   return_dict=False)
    assert prompt + response == full[:len(prompt) + len(response)]
    assert tok.decode(response[:-1]) == ANSWER and response[-1] == eot_id
    assert eot_id in stop_token_ids(tok) and tok.eos_token_id in stop_token_ids(tok)


LLAMA2 = ("{% for message in messages %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + "
          "message['content'].strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + "
          "message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def test_a_sentencepiece_template_tail_is_read_as_the_conversation_tokenizes_it():
    """Llama-2's template closes a turn with " </s>". Tokenized alone, a legacy sentencepiece tokenizer puts a
    word-start mark before the space: ["▁", "▁", "</s>"], a token the model never writes, scored and trained."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])  # legacy
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator([QUESTION, ANSWER, "[INST] [/INST]"] * 5, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)],
        show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  pad_token="</s>", chat_template=LLAMA2)
    rendered = tok.apply_chat_template([{"role": "user", "content": QUESTION}, {"role": "assistant",
                                        "content": ANSWER}], tokenize=False)
    assert rendered.endswith(ANSWER + " </s>")
    in_context = tok.convert_ids_to_tokens(tok(rendered, add_special_tokens=False)["input_ids"])
    assert in_context[-2:] == ["▁", "</s>"]  # one space, as the conversation holds it
    assert tok.convert_ids_to_tokens(end_of_turn_ids(tok)) == ["▁", "</s>"]


def test_a_chatml_token_added_without_the_special_flag_closes_the_turn():
    """ChatML tokens added with tokenizer.add_tokens (not flagged special) beside eos </s>: the end of turn was
    taken to be </s>, so generation ran on past <|im_end|> into the next turn."""
    tok = family_tokenizer("mistral")  # eos </s>, no ChatML tokens
    tok.chat_template = FAMILIES["qwen2.5"][0]
    tok.add_tokens(["<|im_start|>", "<|im_end|>"])
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert not tok.added_tokens_decoder[im_end].special
    assert end_of_turn_ids(tok) == [im_end] and im_end in stop_token_ids(tok)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_labels_end_with_the_template_end_of_turn_token(family):
    tok = family_tokenizer(family)
    eot_id = tok.convert_tokens_to_ids(FAMILIES[family][3])
    chat = [{"role": "user", "content": QUESTION}]
    table = pa.Table.from_pylist([{"prompt": chat, "chosen": [{"role": "assistant", "content": ANSWER}],
                                   "rejected": [{"role": "assistant", "content": "Lyon"}], "prompt_id": "q",
                                   "lang": "en", "ref_logp_chosen": -1.0, "ref_logp_rejected": -2.0}])
    data = encode_dataset(table, "pairs", tok, max_length=512)
    batch = collate(data, [0], pad_id=tok.pad_token_id)
    for b, text in enumerate((ANSWER, "Lyon")):
        labels = batch["input_ids"][b][batch["loss_mask"][b]].tolist()
        assert labels == tok(text, add_special_tokens=False)["input_ids"] + [eot_id]
        if family != "mistral":
            assert tok.eos_token_id not in labels  # the eos is not the turn end: never trained


def test_hf_engine_stops_generation_at_the_template_end_of_turn_token(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from rayalign.engines.hf import HFEngine

    tok = family_tokenizer("llama3")
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = HFEngine(str(tmp_path), device="cpu")
    assert engine.eos_ids == sorted({tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id})


def family_model(tmp_path, family: str, context: int = 64) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = family_tokenizer(family)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=context,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(tmp_path / family)
    tok.save_pretrained(tmp_path / family)
    return str(tmp_path / family)


def test_settings_the_policy_cannot_serve_are_refused_before_any_work(tmp_path):
    """A Gemma-2 template with prompts.system_prompt was a jinja2 TemplateError traceback from inside the generation
    actors; a max_model_len above the model's context, or max_new_tokens filling it, failed every engine or row."""
    from rayalign.config import ConfigError, load_config
    from rayalign.engines import check_engine_settings

    gemma, llama = family_model(tmp_path, "gemma2"), family_model(tmp_path, "llama3")
    cfg = lambda *o: load_config(None, ["sampling.max_new_tokens=16", *o])  # noqa: E731
    check_engine_settings(cfg("prompts.system_prompt=Be brief."), llama)
    check_engine_settings(cfg(), gemma)
    with pytest.raises(ConfigError, match="engines.max_model_len: only the vllm backend uses it"):
        cfg("engines.max_model_len=16")  # the hf engine would not read it
    for policy, overrides, expected in [
            (gemma, ["prompts.system_prompt=Be brief."], "prompts.system_prompt: the policy's chat template refuses "
                                                         "a system message (TemplateError: System role not supported)"),
            (llama, ["engines.backend=vllm", "engines.max_model_len=100"], "engines.max_model_len: 100 is above the "
                                                                          "policy's context of 64 tokens"),
            (llama, ["sampling.max_new_tokens=64"], "sampling.max_new_tokens: 64 leaves no room for a prompt in the "
                                                    "policy's context of 64 tokens")]:
        with pytest.raises(ConfigError, match=re.escape(expected)):
            check_engine_settings(cfg(*overrides), policy)


def test_a_row_the_chat_template_refuses_fails_alone(tmp_path):
    """A system message inside one prompt row: the template's error failed the whole shard (the actor's call)."""
    from rayalign.config import SamplingConfig
    from rayalign.engines.hf import HFEngine
    from rayalign.generation import generate_isolating

    engine = HFEngine(family_model(tmp_path, "gemma2"), device="cpu")
    rows = [{"prompt_id": "p0", "lang": "en", "messages": [{"role": "user", "content": QUESTION}]},
            {"prompt_id": "p1", "lang": "en", "messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": QUESTION}]}]
    samples, errors = generate_isolating(engine, pa.Table.from_pylist(rows), SamplingConfig(n=2, max_new_tokens=4),
                                         1, "gemma2")
    assert samples.column("prompt_id").to_pylist() == ["p0", "p0"]
    assert errors.column("prompt_id").to_pylist() == ["p1"]
    assert "the chat template refused the prompt (TemplateError: System role not supported)" in \
        errors.column("reason")[0].as_py()
