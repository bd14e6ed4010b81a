"""The quickstart trains its tiny model with LoRA until it translates phrases it never saw."""

import os

import velotune
from velotune.quickstart import read_task, run


def test_the_quickstart_learns_its_task_and_saves_a_loadable_adapter(tmp_path):
    lines = []
    result = run(str(tmp_path), max_steps=60, say=lines.append)
    assert result["losses"][-1] < 0.1 * result["losses"][0]
    assert result["right"] >= 18, result["answers"]  # of 20 held-out phrases
    assert any("never saw" in line for line in lines)
    # The saved adapter names its base folder: loading it gives the trained model back.
    model, tokenizer = velotune.FastLanguageModel.from_pretrained(
        result["adapter"], max_seq_length=256, progress=False
    )
    from velotune.quickstart import translate

    velotune.FastLanguageModel.for_inference(model)
    row = read_task("heldout")[0]
    assert translate(model, tokenizer, [row]) == [row["messages"][1]["content"]]
    assert os.path.isfile(os.path.join(result["adapter"], "adapter_config.json"))
