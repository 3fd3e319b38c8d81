"""Document functions of the local lmms-eval tasks (loaded by lmms-eval through `!function utils.*`).

The POPE task reuses lmms-eval's own POPE functions (lmms_eval/tasks/pope/utils.py) unchanged;
the two-image task and the multiple-choice task are ours.
"""
from lmms_eval.tasks.pope.utils import (  # noqa: F401  (named by vlm_dist_pope.yaml)
    pope_aggregate_accuracy, pope_aggregate_f1_score, pope_aggregate_precision, pope_aggregate_recall,
    pope_aggregate_yes_ratio, pope_doc_to_text, pope_doc_to_visual, pope_process_results)


def pairs_doc_to_visual(doc):
    return [doc["image_0"].convert("RGB"), doc["image_1"].convert("RGB")]


def pairs_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    """The images interleaved with the text by `<image>` markers, in doc_to_visual's order."""
    post = (lmms_eval_specific_kwargs or {}).get("post_prompt", "")
    return f"First image: <image>\nSecond image: <image>\nIs this true? {doc['statement']}{post}"


def pairs_process_results(doc, results):
    pred = results[0].strip().lower()
    return {"pair_accuracy": float(pred == doc["answer"])}


def choice_doc_to_visual(doc):
    return [doc["image"].convert("RGB")]
