"""velotune models under transformers.Trainer and TRL's SFTTrainer: a plain Trainer steps; HFTrainer and
velotune's SFTTrainer checkpoints hold the PEFT adapter (not the frozen base) and resume from them."""

import os
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file

import velotune
from tests.model_zoo import rel_err
from tests.train.helpers import random_examples
from velotune.train import DataCollator
from velotune.train.data import TokenizedDataset
from velotune.train.hf_integration import HFTrainer


def load(folder, lora: bool):
    model, _ = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                          full_finetuning=not lora, max_seq_length=64, progress=False)  # fmt: skip
    if lora:
        # At Transformers' init scale (0.02) the frozen LM head caps the logits near +-1, so no adapter
        # could lower the loss much; a wider head leaves the adapters room to learn.
        with torch.no_grad():
            model.lm_head_weight.mul_(10)
        model = velotune.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, use_gradient_checkpointing=False,
                                                          random_state=0)  # fmt: skip
    return model


def hf_args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=1,
                report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)  # fmt: skip
    return transformers.TrainingArguments(**{**base, **kw})


def test_a_plain_transformers_trainer_takes_a_step(folder, tmp_path):
    model = load(folder, lora=False)
    before = model.embed_tokens.weight.detach().clone()
    data = TokenizedDataset.from_examples(random_examples(8, seed=0))
    trainer = transformers.Trainer(model=model, args=hf_args(tmp_path, max_steps=1, gradient_checkpointing=True),
                                   train_dataset=data, data_collator=DataCollator(0))  # fmt: skip
    out = trainer.train()
    assert out.global_step == 1 and torch.isfinite(torch.tensor(out.training_loss))
    assert model.gradient_checkpointing is True
    assert not torch.equal(before, model.embed_tokens.weight)


class Snapshot(transformers.TrainerCallback):
    def __init__(self, model):
        self.model, self.params = model, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.params = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packing", [False, True])
def test_hf_trainer_learns_with_lora_and_checkpoints_the_peft_adapter_only(folder, tmp_path, packing):
    data = TokenizedDataset.from_examples(random_examples(8, seed=1))
    collator = DataCollator(0, packing=packing, max_seq_length=64)
    trainer = HFTrainer(model=load(folder, lora=True), args=hf_args(tmp_path, max_steps=10, learning_rate=1e-2, save_strategy="steps",
                        save_steps=10), train_dataset=data, data_collator=collator)  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 10 and losses[-1] < 0.7 * losses[0]
    ckpt = tmp_path / "checkpoint-10"
    files = set(os.listdir(ckpt))
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainable.safetensors",
        "optimizer.pt",
    } <= files
    assert "model.safetensors" not in files  # the frozen base is not copied into every checkpoint
    assert all("lora" in key for key in load_file(str(ckpt / "adapter_model.safetensors")))

    # Resuming loads the checkpoint's trainable weights into a fresh model before training on.
    model = load(folder, lora=True)
    snap = Snapshot(model)
    resumed = HFTrainer(model=model, args=hf_args(tmp_path, max_steps=12), train_dataset=data,
                        data_collator=collator, callbacks=[snap])  # fmt: skip
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 12
    saved = load_file(str(ckpt / "trainable.safetensors"))
    assert set(saved) == set(snap.params) and all(torch.equal(saved[n], snap.params[n]) for n in saved)


# --- TRL's SFTTrainer ------------------------------------------------------------------------------------

WORDS = "zero one two three four five six seven eight nine ten".split()


def counting_tokenizer():
    """A word-level tokenizer small enough for the tiny model's 101-token vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>"]
    vocab = {word: i for i, word in enumerate([*specials, *WORDS, "<unk>"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>", unk_token="<unk>")  # fmt: skip


@pytest.fixture(scope="module")
def sft_folder(tmp_path_factory):
    """A tiny Llama folder with a tokenizer. Its LM head is 10x Transformers' init scale (see `load`), saved in
    the folder so that Transformers + PEFT read the same base as velotune."""
    from tests.model_zoo import build_hf_model

    path = tmp_path_factory.mktemp("llama_sft")
    hf = build_hf_model("llama", seed=0)
    with torch.no_grad():
        hf.lm_head.weight.mul_(10)
    hf.save_pretrained(str(path))
    counting_tokenizer().save_pretrained(str(path))
    return path


def counting_texts():
    return [" ".join(WORDS[(start + i) % len(WORDS)] for i in range(8)) for start in range(len(WORDS))]


def sft_args(out, packing=False, **kw):
    trl = pytest.importorskip("trl")

    # bf16=False: SFTConfig's default is bf16 autocast, and the tests compare in float32.
    base = dict(output_dir=str(out), per_device_train_batch_size=sft_batch(packing), learning_rate=1e-2,
                logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                max_length=64, packing=packing, bf16=False)  # fmt: skip
    return trl.SFTConfig(**{**base, **kw})


def sft_batch(packing: bool) -> int:
    return 2 if packing else 4


def sft_trainer(folder, out, packing=False, **kw):
    args = sft_args(out, packing, **kw)
    import datasets

    from velotune.train.hf_integration import SFTTrainer

    # TRL's packing joins a batch's packed rows into one row of up to batch x max_length tokens.
    model, tokenizer = velotune.FastLanguageModel.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                                  max_seq_length=64 * sft_batch(packing), progress=False)  # fmt: skip
    model = velotune.FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    dataset = datasets.Dataset.from_dict({"text": counting_texts()})
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trainer_learns_and_its_checkpoint_is_a_peft_adapter_that_peft_loads_to_the_same_logits(
    sft_folder, tmp_path, packing
):
    import peft

    trainer = sft_trainer(sft_folder, tmp_path, packing, max_steps=10, save_strategy="steps", save_steps=10)
    if packing:  # TRL packs padding-free: one row, documents told apart by restarting position_ids
        batch = next(iter(trainer.get_train_dataloader()))
        assert "attention_mask" not in batch and int((batch["position_ids"] == 0).sum()) > 1
    trainer.train()
    losses = logged_losses(trainer)
    assert len(losses) == 10 and losses[-1] < 0.5 * losses[0]

    ckpt = tmp_path / "checkpoint-10"
    files = set(os.listdir(ckpt))
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert not any(name.startswith("model") for name in files)  # the frozen base is not copied
    assert all("lora" in key for key in load_file(str(ckpt / "adapter_model.safetensors")))

    ids = trainer.processing_class(counting_texts()[:3], return_tensors="pt")["input_ids"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(sft_folder), dtype=torch.float32).eval()
    with torch.no_grad():
        base = hf(ids).logits
        theirs = peft.PeftModel.from_pretrained(hf, str(ckpt)).eval()(ids).logits
        ours = trainer.model.eval()(ids).logits
    assert rel_err(ours, theirs) < 1e-5
    assert rel_err(theirs, base) > 1e-2  # the adapter changed the outputs: it was loaded


@pytest.mark.parametrize("packing", [False, True])
def test_trl_sft_trainer_gives_the_loss_sequence_of_trl_on_transformers_and_peft(
    sft_folder, tmp_path, packing
):
    """Same data, same initial adapter, 10 steps: velotune's model under velotune's SFTTrainer and Transformers +
    PEFT under TRL's own SFTTrainer log the same losses."""
    import datasets
    import peft
    import trl

    kw = dict(max_steps=10, gradient_checkpointing=False)  # (on by default: the test above runs with it)
    ours = sft_trainer(sft_folder, tmp_path / "velotune", packing, **kw)
    ours.model.save_pretrained(str(tmp_path / "initial"))
    ours.train()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(sft_folder), dtype=torch.float32)
    reference = peft.PeftModel.from_pretrained(hf, str(tmp_path / "initial"), is_trainable=True)
    theirs = trl.SFTTrainer(model=reference, args=sft_args(tmp_path / "reference", packing, **kw), train_dataset=datasets.Dataset.from_dict({"text": counting_texts()}),
                            processing_class=ours.processing_class)  # fmt: skip
    theirs.train()
    assert len(logged_losses(ours)) == 10
    torch.testing.assert_close(logged_losses(ours), logged_losses(theirs), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kind", ["transformers", "trl"])
def test_train_resume_from_checkpoint_true_continues_the_uninterrupted_loss_sequence(
    folder, sft_folder, tmp_path, kind
):
    def build():
        kw = dict(max_steps=10, save_strategy="steps", save_steps=5)
        if kind == "trl":
            return sft_trainer(sft_folder, tmp_path, gradient_checkpointing=False, **kw)
        data = TokenizedDataset.from_examples(random_examples(8, seed=1))
        return HFTrainer(model=load(folder, lora=True), args=hf_args(tmp_path, per_device_train_batch_size=4, **kw),
                         train_dataset=data, data_collator=DataCollator(0))  # fmt: skip

    whole = build()
    whole.train()
    # An interrupted run: its last checkpoint is step 5.
    shutil.rmtree(tmp_path / "checkpoint-10")
    resumed = build()
    snap, steps = Snapshot(resumed.model), StepCounter()
    resumed.add_callback(snap)
    resumed.add_callback(steps)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 10 and steps.count == 5
    saved = load_file(str(tmp_path / "checkpoint-5" / "trainable.safetensors"))
    assert set(saved) == set(snap.params) and all(torch.equal(saved[n], snap.params[n]) for n in saved)
    assert len(logged_losses(whole)) == 10
    torch.testing.assert_close(logged_losses(resumed), logged_losses(whole), rtol=1e-6, atol=0)


class StepCounter(transformers.TrainerCallback):
    count = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.count += 1


@pytest.mark.parametrize("wrong, message", [("peft_config", "get_peft_model"), ("model_name", "from_pretrained"),
                                            ("loss_type", "loss_type='nll'")])  # fmt: skip
def test_velotune_sft_trainer_refuses_what_a_velotune_model_cannot_do_before_training(
    sft_folder, tmp_path, wrong, message
):
    import peft

    trl = pytest.importorskip("trl")
    from velotune.errors import ConfigError
    from velotune.train.hf_integration import SFTTrainer

    model, tokenizer = velotune.FastLanguageModel.from_pretrained(str(sft_folder), dtype=torch.float32,
                                                                  device_map="cpu", progress=False)  # fmt: skip
    args = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    kw = dict(model=model, train_dataset=None, processing_class=tokenizer)
    if wrong == "peft_config":
        kw["peft_config"] = peft.LoraConfig(r=4, target_modules=["q_proj"])
    elif wrong == "model_name":
        kw["model"] = "meta-llama/Llama-3.2-1B"
    else:
        args["loss_type"] = "dft"
    with pytest.raises(ConfigError, match=message):
        SFTTrainer(args=trl.SFTConfig(**args), **kw)
