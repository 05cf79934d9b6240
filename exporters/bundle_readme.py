"""README.md of the mobile bundle: how an Android (Kotlin) or iOS (Swift) app loads model.ort, feeds
it, runs the self-test, and which execution provider to enable. Filled from the manifest."""
from __future__ import annotations

import json

__all__ = ["render_readme"]

_KOTLIN_TYPES = {"float32": ("FloatBuffer", "Float", "float"), "int64": ("LongBuffer", "Long", "long"),
                 "int32": ("IntBuffer", "Int", "int")}
_SWIFT_TYPES = {"float32": (".float", "Float"), "int64": (".int64", "Int64"), "int32": (".int32", "Int32")}


def _shape(dims) -> str:
    return ", ".join(str(d) for d in dims)


def _kotlin(m: dict, nnapi: bool) -> str:
    lines = ["import ai.onnxruntime.*", "import java.nio.*", "",
             "val env = OrtEnvironment.getEnvironment()",
             "val options = OrtSession.SessionOptions().apply {",
             "    setIntraOpNumThreads(2)",
             f"    {'' if nnapi else '// '}addNnapi()  // NNAPI: {'covers the whole graph' if nnapi else 'not recommended for this model (see manifest usability_notes)'}",
             "}",
             'val session = env.createSession(context.assets.open("model.ort").readBytes(), options)', ""]
    feeds = []
    for i in m["inputs"]:
        buf, _, _ = _KOTLIN_TYPES.get(i["dtype"], _KOTLIN_TYPES["float32"])
        var = i["name"].replace(".", "_")
        lines.append(f"val {var}: {buf} = ...  // {i['dtype']} [{_shape(i['shape'])}], see preprocessing")
        lines.append(f"val {var}Tensor = OnnxTensor.createTensor(env, {var}, longArrayOf({_shape(i['shape'])}))")
        feeds.append(f'"{i["name"]}" to {var}Tensor')
    out = m["outputs"][0]
    lines += [f"session.run(mapOf({', '.join(feeds)})).use {{ result ->",
              f'    val {out["name"]} = result.get("{out["name"]}").get().value  // [{_shape(out["shape"])}]',
              "}"]
    return "\n".join(lines)


def _swift(m: dict) -> str:
    lines = ["import onnxruntime_objc", "",
             "let env = try ORTEnv(loggingLevel: .warning)",
             "let options = try ORTSessionOptions()",
             "try options.setIntraOpNumThreads(2)",
             "// CPU execution provider: CoreML does not take this int8 (QDQ) graph; see manifest usability_notes",
             'let path = Bundle.main.path(forResource: "model", ofType: "ort")!',
             "let session = try ORTSession(env: env, modelPath: path, sessionOptions: options)", ""]
    feeds = []
    for i in m["inputs"]:
        et, st = _SWIFT_TYPES.get(i["dtype"], _SWIFT_TYPES["float32"])
        var = i["name"].replace(".", "_")
        lines += [f"var {var}: [{st}] = ...  // {i['dtype']} [{_shape(i['shape'])}], see preprocessing",
                  f"let {var}Value = try ORTValue(tensorData: NSMutableData(bytes: &{var}, "
                  f"length: {var}.count * MemoryLayout<{st}>.stride),",
                  f"                               elementType: {et}, shape: [{_shape(i['shape'])}])"]
        feeds.append(f'"{i["name"]}": {var}Value')
    out = m["outputs"][0]["name"]
    lines += [f'let outputs = try session.run(withInputs: [{", ".join(feeds)}], outputNames: ["{out}"], runOptions: nil)',
              f'let {out} = try outputs["{out}"]!.tensorData() as Data  // float32, little-endian']
    return "\n".join(lines)


def render_readme(m: dict) -> str:
    ort = m["onnxruntime"]
    version = ort.get("version_used") or "1.x"
    nnapi = m["execution_provider"].get("android") == "NNAPI"
    st = m["self_test"]
    lines = [
        f"# {m['name']}: mobile bundle", "",
        f"Task: {m['task']}. Built by sqexport and verified with onnxruntime {version} "
        f"(model.ort: ORT format v{ort.get('ort_format_version')}, readable by onnxruntime "
        f">= {ort.get('min_version_reading_model_ort')}; use {version} to run exactly what was verified).", "",
        "## Files", "",
        "- `model.ort`: the model to ship (ORT format, optimizations baked in, fixed input shapes)",
        "- `model.onnx`: the same model as ONNX (fixed shapes), for tools and the full onnxruntime",
        "- `required_operators.config`: operators and types for a minimal onnxruntime build "
        "(`build.sh --minimal_build --include_ops_by_config required_operators.config`)",
        f"- `{st.get('file', 'reference.npz')}`: reference inputs and outputs for an on-device self-test",
        f"- `{st.get('runner', 'run_model.py')}`: runs the self-test and a latency benchmark "
        "(Python with numpy and onnxruntime, e.g. Termux; or `sqexport bench`)",
        "- `manifest.json`: inputs/outputs, preprocessing, labels, metrics, versions, sha256 of every file", "",
        "## Inputs and outputs", ""]
    lines += [f"- input `{i['name']}`: {i['dtype']} [{_shape(i['shape'])}] {i.get('layout') or ''}" for i in m["inputs"]]
    lines += [f"- output `{o['name']}`: {o['dtype']} [{_shape(o['shape'])}]" for o in m["outputs"]]
    lines += ["", "## Preprocessing", "", "```json", json.dumps(m["preprocessing"], indent=2), "```"]
    if m.get("labels"):
        lines += ["", f"Labels (output order): {', '.join(map(str, m['labels']))}"]
    lines += ["", "## Execution provider", ""] + [f"- {n}" for n in m.get("usability_notes", [])]
    lines += [f"- Android: {m['execution_provider'].get('android')}; iOS: {m['execution_provider'].get('ios')}", "",
              "## Android (Kotlin, onnxruntime-android)", "", "Gradle:", "", "```gradle",
              f'implementation "com.microsoft.onnxruntime:onnxruntime-android:{version}"', "```", "",
              "```kotlin", _kotlin(m, nnapi), "```", "",
              "## iOS (Swift, onnxruntime-objc)", "", "CocoaPods:", "", "```ruby",
              f"pod 'onnxruntime-objc', '{version}'", "```", "", "```swift", _swift(m), "```", "",
              "## Self-test", "",
              f"`{st.get('file')}` holds {st.get('samples')} samples: `input:NAME` arrays (first axis = sample, "
              "each sample one run) and the `output:NAME` arrays of the exact int8 arithmetic the graph describes "
              "(what ARM int8 kernels compute). "
              "Run each sample and compare per sample: ||output - reference|| / ||reference|| (L2 over the "
              f"whole output) should stay within {st.get('max_rel_error', 0.05)}; usually the largest |difference| "
              f"is also within {st.get('rtol')} x the largest |reference output| "
              "(ARM kernels requantize in fixed point and may round an activation one step apart; x86 CPUs "
              "without VNNI saturate full-range int8 weights and land further off). From Python on the device:", "",
              "```sh", f"python {st.get('runner')} model.ort --reference {st.get('file')} --threads 1,2", "```", "",
              "It prints one JSON line (latency p50/p90 per thread count, model sha256, outputs sha256, "
              "max |diff| vs the reference, peak memory)."]
    return "\n".join(lines) + "\n"
