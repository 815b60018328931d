"""Helpers for the jobs tests: a tiny random model with SmolLM2's tokenizer and chat template, synthetic
(entirely made up) patient notes in Chinese and English, and batch input lines."""
import json
import random
from pathlib import Path

SURNAMES_ZH = "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗"
GIVEN_ZH = "伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平"
SYMPTOMS_ZH = ["发热", "咳嗽", "胸痛", "腹痛", "头晕", "乏力", "气促", "恶心", "呕吐", "腰痛"]
FINDINGS_ZH = ["双肺可闻及湿啰音", "心律齐，未闻及杂音", "腹软，右下腹压痛", "神经系统查体未见异常", "双下肢轻度水肿"]
PLANS_ZH = ["给予头孢曲松抗感染治疗", "予阿司匹林及他汀类药物", "建议行腹部CT检查", "继续观察生命体征", "予补液及对症支持"]

NAMES_EN = ["Alex Morgan", "Jamie Lee", "Sam Carter", "Riley Brooks", "Casey Quinn", "Jordan Avery", "Taylor Reed"]
SYMPTOMS_EN = ["fever", "cough", "chest pain", "abdominal pain", "dizziness", "fatigue", "shortness of breath"]
FINDINGS_EN = ["crackles at both lung bases", "regular heart rhythm without murmur", "tenderness in the right lower "
               "quadrant", "no focal neurological deficit", "mild bilateral ankle oedema"]
PLANS_EN = ["start ceftriaxone", "aspirin and a statin", "abdominal CT scan", "observe vital signs every 4 hours",
            "oral fluids and symptomatic care"]


def fake_note_zh(rng: random.Random, num_visits: int = 1) -> str:
    """A made-up Chinese clinical note; `num_visits` paragraphs-groups make it as long as wanted."""
    name = rng.choice(SURNAMES_ZH) + rng.choice(GIVEN_ZH) + rng.choice(GIVEN_ZH)
    parts = [f"患者{name}，{rng.choice('男女')}，{rng.randint(18, 95)}岁。"]
    for visit in range(num_visits):
        parts.append(
            f"第{visit + 1}次就诊：因{rng.choice(SYMPTOMS_ZH)}、{rng.choice(SYMPTOMS_ZH)}{rng.randint(1, 14)}天就诊。"
            f"体温{rng.randint(36, 39)}.{rng.randint(0, 9)}℃，心率{rng.randint(60, 120)}次/分。"
            f"查体：{rng.choice(FINDINGS_ZH)}。血常规示白细胞{rng.randint(4, 18)}.{rng.randint(0, 9)}×10⁹/L！"
            f"诊断考虑感染？处理：{rng.choice(PLANS_ZH)}；嘱{rng.randint(3, 14)}天后复诊。")
    return "\n\n".join(parts) + "\n"


def fake_note_en(rng: random.Random, num_visits: int = 1) -> str:
    """A made-up English clinical note."""
    parts = [f"Patient {rng.choice(NAMES_EN)}, age {rng.randint(18, 95)}."]
    for visit in range(num_visits):
        parts.append(
            f"Visit {visit + 1}: presented with {rng.choice(SYMPTOMS_EN)} and {rng.choice(SYMPTOMS_EN)} for "
            f"{rng.randint(1, 14)} days. Temperature {rng.randint(36, 39)}.{rng.randint(0, 9)} C, heart rate "
            f"{rng.randint(60, 120)}. Examination: {rng.choice(FINDINGS_EN)}. Plan: {rng.choice(PLANS_EN)}; "
            f"review in {rng.randint(3, 14)} days.")
    return "\n\n".join(parts) + "\n"


def tiny_chat_model(make_tiny_model, hf_tokenizer_dir: Path) -> Path:
    """A tiny random Llama with SmolLM2's full vocabulary (so real text tokenizes) and its chat template."""
    directory, _ = make_tiny_model("llama", vocab_size=49152, max_position_embeddings=512)
    for file in hf_tokenizer_dir.iterdir():
        if file.name.startswith("chat_template"):
            (directory / file.name).write_bytes(file.read_bytes())
    return directory


def chat_line(custom_id: str, content: str, max_tokens: int = 4, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **body}}


def write_jsonl(path: Path, records: list) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            f.write("\n")
    return path


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
