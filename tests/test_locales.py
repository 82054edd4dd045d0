"""Translations and help pages for every node: ComfyUI's front end reads `locales/<lang>/nodeDefs.json` (node names,
input and output names, tooltips) and `main.json` (category names) through the server's /i18n, and asks for a
node's help page at `web/docs/<NodeId>/<lang>.md`. English repeats what the node classes declare; Chinese has the
same entries, translated."""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LOCALES = ROOT / "locales"
DOCS = ROOT / "web" / "docs"
LANGUAGES = ["en", "zh"]
CJK = re.compile(r"[\u4e00-\u9fff]")


def load(lang, name):
    return json.loads((LOCALES / lang / name).read_text(encoding="utf-8"))


def declared_inputs(cls):
    declared = cls.INPUT_TYPES()
    return {**declared["required"], **declared.get("optional", {})}


def node_defs_from_classes(pack) -> dict:
    """The English nodeDefs.json entries as the node classes declare them."""
    defs = {}
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        inputs = {}
        for name, spec in declared_inputs(cls).items():
            entry = {"name": name}
            if len(spec) > 1 and spec[1].get("tooltip"):
                entry["tooltip"] = spec[1]["tooltip"]
            inputs[name] = entry
        names = getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)
        tooltips = getattr(cls, "OUTPUT_TOOLTIPS", (None,) * len(names))
        outputs = {str(i): {"name": name, **({"tooltip": tip} if tip else {})}
                   for i, (name, tip) in enumerate(zip(names, tooltips))}
        defs[node_id] = {"display_name": pack.NODE_DISPLAY_NAME_MAPPINGS[node_id], "description": cls.DESCRIPTION,
                         "inputs": inputs, "outputs": outputs}
    return defs


def shape(tree):
    """The keys of a nested dict, with leaves replaced by None: what two languages must share."""
    return {k: shape(v) for k, v in tree.items()} if isinstance(tree, dict) else None


def leaves(tree, path=()):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from leaves(value, (*path, key))
        else:
            yield (*path, key), value


def test_english_node_defs_repeat_the_node_classes(pack):
    expected = node_defs_from_classes(pack)
    actual = load("en", "nodeDefs.json")
    assert actual == expected, ("locales/en/nodeDefs.json differs from the node classes; it should be:\n"
                                + json.dumps(expected, indent=2, ensure_ascii=False))


def test_chinese_node_defs_translate_every_english_entry():
    english, chinese = load("en", "nodeDefs.json"), load("zh", "nodeDefs.json")
    assert shape(chinese) == shape(english)
    untranslated = []
    for path, text in leaves(chinese):
        assert isinstance(text, str) and text.strip(), path
        # input and output names that are identifiers may stay as they are (e.g. "vae", "seed" in core's own zh)
        if path[-1] != "name" and not CJK.search(text):
            untranslated.append(path)
    assert untranslated == []


def test_category_names_cover_every_node_category(pack):
    segments = {part for cls in pack.NODE_CLASS_MAPPINGS.values() for part in cls.CATEGORY.split("/")}
    for lang in LANGUAGES:
        categories = load(lang, "main.json")["nodeCategories"]
        assert set(categories) == segments, lang
    assert any(CJK.search(name) for name in load("zh", "main.json")["nodeCategories"].values())


@pytest.mark.parametrize("lang", LANGUAGES)
def test_every_node_has_a_help_page_naming_its_inputs_and_outputs(pack, lang):
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        page = DOCS / node_id / f"{lang}.md"
        assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
        text = page.read_text(encoding="utf-8")
        names = [*declared_inputs(cls), *getattr(cls, "RETURN_NAMES", ())]
        missing = [name for name in names if f"`{name}`" not in text]
        assert missing == [], f"{page.relative_to(ROOT)} does not describe {missing}"
        if lang == "zh":
            assert len(CJK.findall(text)) > 50, f"{page.relative_to(ROOT)} is not in Chinese"
    assert sorted(p.name for p in DOCS.iterdir() if p.is_dir()) == sorted(pack.NODE_CLASS_MAPPINGS)
    assert sorted(p.name for p in DOCS.glob("*.md")) == ["ui_payloads.md"], "help pages live in docs/<NodeId>/"
