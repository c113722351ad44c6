"""Run in the tritonclient venv (never imports peftserve): asks a server what the KServe test
needs through tritonclient.grpc and prints the answers as one JSON object.

    python kserve_client.py HOST:PORT BASE_MODEL '{"prompt": ..., "max_tokens": ...}'
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException


def infer(client: triton.InferenceServerClient, model: str, prompts: list[str],
          parameters: dict) -> dict:
    data = np.array([p.encode() for p in prompts], dtype=np.object_)
    tensor = triton.InferInput("text_input", [len(prompts)], "BYTES")
    tensor.set_data_from_numpy(data)
    try:
        result = client.infer(model, [tensor], parameters=parameters, request_id="kserve-1",
                              outputs=[triton.InferRequestedOutput("text_output")])
    except InferenceServerException as e:
        return {"error": e.status(), "message": e.message()}
    response = result.get_response()
    return {"texts": [t.decode() for t in result.as_numpy("text_output").tolist()],
            "id": response.id, "model": response.model_name,
            "parameters": {k: getattr(v, v.WhichOneof("parameter_choice"))
                           for k, v in response.parameters.items()}}


def main() -> None:
    target, base, spec = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    prompt, params = spec["prompt"], {"max_tokens": spec["max_tokens"], "temperature": 0.0,
                                      "ignore_eos": True}
    with triton.InferenceServerClient(target) as c:
        out = {
            "live": c.is_server_live(), "ready": c.is_server_ready(),
            "server": c.get_server_metadata().name,
            "model_ready": {m: c.is_model_ready(m) for m in (base, "lora", "no-such-adapter")},
            "lora_metadata": json.loads(json.dumps(c.get_model_metadata("lora", as_json=True))),
            "infer": {m: infer(c, m, [prompt], params) for m in (base, "lora", "prefix")},
            "batch": infer(c, "lora", [prompt, "hello world"], params),
            "seeded": infer(c, "lora", [prompt], {"max_tokens": spec["max_tokens"],
                                                 "temperature": 1.0, "top_p": 0.9, "seed": 7,
                                                 "ignore_eos": True}),
            "unknown_model": infer(c, "no-such-adapter", [prompt], params),
            "bad_parameter": infer(c, base, [prompt], {"max_tokens": 4, "beam_width": 3}),
        }
        try:
            c.get_model_metadata("no-such-adapter")
        except InferenceServerException as e:
            out["unknown_metadata"] = e.status()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
