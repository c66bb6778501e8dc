"""A tiny random-weight look-alike of ``llava-hf/llava-interleave-qwen-7b-hf``.

Tests, demos and CI machines without a GPU or hub access need a model that goes
through exactly the code path of the real one (``LlavaForConditionalGeneration``
and ``LlavaProcessor`` loaded with ``from_pretrained``, the same special tokens,
chat template, image geometry and generation config) but weighs a few hundred
kilobytes and answers in well under a second on one CPU thread. Its answers are
gibberish, but deterministic for a given seed, so equality tests mean something.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import Qwen2Tokenizer

# Same order as the real vocabulary, where they follow the regular tokens:
# 151643 <|endoftext|>, 151644 <|im_start|>, 151645 <|im_end|>, 151646 <image>.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")

# Verbatim from the real repository's chat_template.json.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Qwen2's pre-tokenisation split, so the tiny BPE segments text the way the real
# tokenizer does (contractions, single digits, runs of punctuation).
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The words users actually send (videos, animals, actions, colours, questions),
# so common question words become single tokens as they would in the real model.
_CORPUS = """\
Are these two cats in these two videos doing the same thing?
What is happening in this video? Describe the scene in detail.
A small grey cat jumps onto the wooden table and knocks over a glass of water.
The black dog runs across the green field and catches a red ball.
Two kittens are playing with a ball of yellow wool on the sofa.
How many people are walking in the street at the beginning of the clip?
There are three people: a man in a blue jacket, a woman with an umbrella and a child.
What colour is the car that stops at the traffic light? The car is white.
Is the bird flying or sitting on the branch? The bird is sitting, then it flies away.
Why does the horse stop running? Because the gate in front of it is closed.
Where is the camera pointing when the video ends? It points at the sea and the sky.
The cat is sleeping in a cardboard box next to the window, in the morning sun.
First the chef cuts the onions, then he fries them in a pan with some oil.
Which animal is bigger, the elephant or the giraffe? The elephant is heavier.
Yes, both cats are chasing a laser dot on the floor. No, they are not fighting.
The first video shows a cat eating; the second shows a cat drinking milk.
Compare the two clips and explain what changes between them.
A brown rabbit hides under a bush while an orange fox walks past slowly.
The children are laughing, dancing and singing in the garden at the party.
What is the man holding in his left hand? He is holding a phone and a cup of coffee.
At the start a purple balloon floats up; at the end it pops against the ceiling.
Count the ducks swimming in the pond. I can see four ducks and one swan.
The monkey climbs the tree, picks a banana, peels it and eats it quickly.
A woman rides a bicycle along the river while a dog follows her.
Is it day or night in this video? It is night, the street lamps are on.
The fish swim in circles around the pink coral near the bottom of the tank.
Describe the weather: it is raining, the wind is strong and the sky is dark.
Can you tell me what the cat does after it wakes up? It stretches and yawns.
The player kicks the ball, the goalkeeper dives, but the ball goes into the net.
Both videos show cats, but only one of them is playing; the other is resting.
Snow falls on the mountains, and a white bear walks slowly through the forest.
The robot picks up the blue cube and places it on top of the green cube.
What sound would you expect here? Probably a loud bark, then some music.
In 2024 we recorded 12 short clips of 30 seconds each, at 25 frames per second.
The answer is short: the cat opens the door by pulling the handle with its paw.
Cows graze quietly in the meadow; a farmer drives his old tractor behind them.
Who is speaking at the beginning? A teacher explains the lesson to her students.
The puppy tries to climb the stairs, slips, and finally reaches the top.
Watch the squirrel: it gathers nuts, buries them, and looks around nervously.
Does the person in the kitchen wash the dishes before or after cooking dinner?
Suddenly the lights turn off and everyone in the room starts to scream.
A silver airplane takes off from the runway and disappears behind the clouds.
The turtle moves slowly, but the lizard runs very fast across the hot sand.
The user asks the assistant a question, and the assistant answers it politely.
Summarise the video in one sentence, then list the objects you noticed.
"""


def _train_tokenizer() -> Qwen2Tokenizer:
    """Train a byte-level BPE on the built-in corpus and wrap it like Qwen's."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    # The whole byte alphabet keeps any input encodable, as in the real tokenizer;
    # the corpus is too small to reach the target size, so the vocab ends up ~1k.
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)

    vocab = bpe.get_vocab()
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )
    return tokenizer


def build_tiny_model(directory: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny LLaVA-Interleave look-alike into ``directory`` and return it.

    The directory is created if needed and its model files are overwritten, so
    calling this twice with the same seed leaves identical weights behind.
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        Qwen2Config,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer = _train_tokenizer()
    bos_id, eos_id = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"])
    image_id = tokenizer.convert_tokens_to_ids("<image>")

    # With the usual 0.02 the random logits are nearly flat and greedy decoding
    # repeats one token; 0.2 (which also sets the projector's init) varies them.
    text_config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    # Real SigLIP geometry (384 px, patch 14: 27 x 27 = 729 tokens per image) so
    # prompt lengths and image preprocessing match the real model exactly.
    vision_config = SiglipVisionConfig(
        image_size=384,
        patch_size=14,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_id,
        image_seq_length=729,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )

    # A forked RNG keeps the build reproducible without disturbing the caller's
    # random state (tests that build a model mid-run stay deterministic too).
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    # Stored in bfloat16 like the real checkpoint, so ``dtype="auto"`` behaves
    # the same; loading with ``dtype=torch.float32`` upcasts exactly.
    model.to(torch.bfloat16)
    # As in the real repository: no pad_token_id, callers that batch pass one.
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id)
    model.save_pretrained(directory, safe_serialization=True)

    image_processor = SiglipImageProcessorPil(
        size={"height": 384, "width": 384},
        resample=3,  # PIL bicubic
        rescale_factor=1 / 255,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(directory)
    return directory
