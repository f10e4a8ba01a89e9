"""Tiny randomly initialised backbones of the image-text families other than the toy world's
(prm.tiny_backbone is Qwen2-VL with a reduced template): each family's own config, model and Pillow
image processor classes at a tiny size, its special tokens, and the chat template its checkpoint
publishes, unreduced, so that a test sees what a real checkpoint renders (Idefics3's, for one,
prints nothing for a message whose content is a plain string). Only tests/ use these.

    model, tokenizer, image_processor = tiny_families.backbone("gemma3")
    path = tiny_families.save(folder, "gemma3")          # a checkpoint folder, written once
"""
import os
import sys
from functools import partial

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prm  # noqa: E402

# -- The published chat templates ------------------------------------------------------------

QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-2B-Instruct and Qwen/Qwen2.5-VL-3B-Instruct, chat_template.json
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content "
    "or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' "
    "or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}"
    "{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")

QWEN3_VL_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
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

INTERNVL_TEMPLATE = (  # OpenGVLab/InternVL3-1B-hf (the transformers-native conversion)
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}{% endif %}")

LLAVA_ONEVISION_TEMPLATE = (  # llava-hf/llava-onevision-qwen2-0.5b-ov-hf: images, videos, then text; strings print nothing
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

GEMMA3_TEMPLATE = (  # google/gemma-3-4b-it
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n")

IDEFICS3_TEMPLATE = (  # HuggingFaceTB/SmolVLM-256M-Instruct (model_type idefics3): list content only
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")

SMOLVLM_TEMPLATE = (  # HuggingFaceTB/SmolVLM2-2.2B-Instruct (model_type smolvlm): as Idefics3's, and videos
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")


# -- Configs, model classes and image processors at a tiny size -------------------------------

def _text(tok, hidden, layers, heads, **extra):
    """A small decoder's config fields (the language model inside each family)."""
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=4096,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **extra)


def _vision(hidden, image_size, model_type=None):
    """A one-layer ViT's config fields (SigLIP-like), on image_size pixels in 14-pixel patches."""
    return dict(hidden_size=hidden // 2, num_hidden_layers=1, num_attention_heads=2, intermediate_size=hidden,
                image_size=image_size, patch_size=14, **({"model_type": model_type} if model_type else {}))


def _mrope(tok, hidden, layers, heads, **extra):
    """A Qwen decoder's fields with M-RoPE's split of the rotary frequencies over (t, h, w)."""
    return _text(tok, hidden, layers, heads, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), rope_parameters=dict(
        rope_type="default", rope_theta=10000.0, mrope_section=prm._mrope_section(hidden // heads), **extra))


def _qwen_ids(tok):
    tid = tok.convert_tokens_to_ids
    return dict(image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"))


def _qwen2_vl(tok, hidden, layers, heads):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    config = Qwen2VLConfig(text_config=_mrope(tok, hidden, layers, heads),
                           vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                                              patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **_qwen_ids(tok))
    return config, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


def _qwen2_5_vl(tok, hidden, layers, heads):
    """Qwen2.5-VL: Qwen2-VL's tokenizer and image processor, window attention in the vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    config = Qwen2_5_VLConfig(
        text_config=_mrope(tok, hidden, layers, heads),
        vision_config=dict(depth=1, hidden_size=hidden // 2, out_hidden_size=hidden, num_heads=2, intermediate_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, fullatt_block_indexes=[0],
                           window_size=112), **_qwen_ids(tok))
    return config, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=112 * 112)


def _qwen3_vl(tok, hidden, layers, heads):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    config = Qwen3VLConfig(
        text_config=_mrope(tok, hidden, layers, heads, mrope_interleaved=True) | dict(head_dim=hidden // heads),
        vision_config=dict(depth=1, hidden_size=hidden // 2, intermediate_size=hidden, num_heads=2, out_hidden_size=hidden,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                           deepstack_visual_indexes=[0]), **_qwen_ids(tok))
    # 64x64 to 128x128 pixels: 4 to 16 image tokens after the 2x2 merge of 16-pixel patches.
    return config, Qwen3VLForConditionalGeneration, Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, min_pixels=64 * 64, max_pixels=128 * 128, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _internvl(tok, hidden, layers, heads):
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    config = InternVLConfig(vision_config=dict(_vision(hidden, 56), intermediate_size=hidden),
                            text_config=dict(_text(tok, hidden, layers, heads), model_type="qwen2"),
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=4,
                            downsample_ratio=0.5)
    # 56-pixel tiles (4 tokens each after the pixel shuffle), up to 4 tiles and a thumbnail.
    return config, InternVLForConditionalGeneration, GotOcr2ImageProcessorPil(
        size={"height": 56, "width": 56}, crop_to_patches=True, min_patches=1, max_patches=4)


def _llava_onevision(tok, hidden, layers, heads):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    config = LlavaOnevisionConfig(vision_config=_vision(hidden, 28, "siglip_vision_model"),
                                  text_config=dict(_text(tok, hidden, layers, heads), model_type="qwen2"),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints)
    # 28-pixel base image (4 tokens) and anyres grids up to 2x2 such patches.
    return config, LlavaOnevisionForConditionalGeneration, LlavaOnevisionImageProcessorPil(
        size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)


def _gemma3(tok, hidden, layers, heads, tokens_per_image=4):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    tid = tok.convert_tokens_to_ids
    config = Gemma3Config(text_config=_text(tok, hidden, layers, heads, head_dim=hidden // heads, sliding_window=512,
                                            bos_token_id=tid("<bos>")),
                          vision_config=_vision(hidden, 56), mm_tokens_per_image=tokens_per_image,
                          boi_token_index=tid("<start_of_image>"), eoi_token_index=tid("<end_of_image>"),
                          image_token_index=tid("<image_soft_token>"))
    # 56x56 images: 16 patches pooled to 4 soft tokens.
    return config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil(size={"height": 56, "width": 56})


def _idefics3(tok, hidden, layers, heads, smol=False):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
    Config, Model, Processor = (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil) if smol else \
        (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil)
    config = Config(vision_config=_vision(hidden, 56), text_config=dict(_text(tok, hidden, layers, heads),
                                                                        model_type="llama"),
                    scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    # Images up to 112 pixels split into 56-pixel tiles (4 tokens each) and the global image.
    return config, Model, Processor(size={"longest_edge": 112}, max_image_size={"longest_edge": 56})


_QWEN_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_ROWS_COLS = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
_IDEFICS3 = dict(special=["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                          "<global-img>", "<video>"] + _ROWS_COLS,
                 eos="<end_of_utterance>", pad="<|endoftext|>",
                 named=dict(image_token="<image>", fake_image_token="<fake_token_around_image>",
                            global_image_token="<global-img>", end_of_utterance_token="<end_of_utterance>"))
_QWEN = dict(special=prm.SPECIAL_TOKENS, eos="<|im_end|>", pad="<|endoftext|>", named={})
# family -> its tokenizer's special tokens, published chat template, eos, pad (and bos) tokens, named
# special tokens (tokenizer attributes its processor reads), and the builder of its config, model
# class and image processor.
FAMILIES = {
    "qwen2_vl": dict(_QWEN, template=QWEN2_VL_TEMPLATE, build=_qwen2_vl),
    "qwen2_5_vl": dict(_QWEN, template=QWEN2_VL_TEMPLATE, build=_qwen2_5_vl),
    "qwen3_vl": dict(_QWEN, template=QWEN3_VL_TEMPLATE, build=_qwen3_vl),
    "internvl": dict(special=_QWEN_TOKENS + ["<img>", "</img>", "<IMG_CONTEXT>", "<video>"], template=INTERNVL_TEMPLATE,
                     eos="<|im_end|>", pad="<|endoftext|>",
                     named=dict(start_image_token="<img>", end_image_token="</img>",
                                context_image_token="<IMG_CONTEXT>", video_token="<video>"), build=_internvl),
    "llava_onevision": dict(special=_QWEN_TOKENS + ["<image>", "<video>"], template=LLAVA_ONEVISION_TEMPLATE,
                            eos="<|im_end|>", pad="<|endoftext|>", named=dict(image_token="<image>", video_token="<video>"),
                            build=_llava_onevision),
    "gemma3": dict(special=["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                            "<end_of_image>", "<image_soft_token>"], template=GEMMA3_TEMPLATE, eos="<end_of_turn>",
                   pad="<pad>", bos="<bos>",
                   named=dict(boi_token="<start_of_image>", eoi_token="<end_of_image>", image_token="<image_soft_token>"),
                   build=_gemma3),
    "idefics3": dict(_IDEFICS3, template=IDEFICS3_TEMPLATE, build=_idefics3),
    "smolvlm": dict(_IDEFICS3, template=SMOLVLM_TEMPLATE, build=partial(_idefics3, smol=True)),
}


def backbone(family, seed=0, hidden_size=64, layers=2, heads=4, **build):
    """(model, tokenizer, image processor) of a family at a tiny size, deterministic for a seed.
    Every weight matrix is random: one that the class's own initialisation leaves at zero (Gemma 3
    keeps multi_modal_projector.mm_input_projection_weight at zeros, so every image would give the
    same soft tokens) is drawn like the others. `build`: keyword arguments for the family's builder."""
    spec = FAMILIES[family]
    tokenizer = prm._tiny_tokenizer(special=spec["special"], template=spec["template"], eos=spec["eos"],
                                    pad=spec["pad"], bos=spec.get("bos"), named=spec["named"])
    config, model_class, image_processor = spec["build"](tokenizer, hidden_size, layers, heads, **build)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2 and not p.any():
                p.normal_(0.0, 0.02)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer, image_processor


def save(path, family, **build):
    """A checkpoint folder of the family's tiny backbone (written once, reused)."""
    return prm.save_tiny_backbone(path, build=partial(backbone, family, **build))
