"""`osd replay`: send Spec-Bench questions to a running osd endpoint and print what came back.

`make run` uses it so the dashboard has data right away; later drift benchmarks replay
phases of traffic through it. Plain HTTP (httpx): it exercises the same API users call.
"""

from __future__ import annotations

import time

import httpx

from osd.data.workloads import load_questions, spread_across_categories


def replay(url: str, questions: list[dict], max_tokens: int = 64, timeout_s: float = 300.0,
           admin_token: str | None = None) -> list[dict]:
    """POST each question as a greedy chat completion; returns one summary dict per request."""
    results = []
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    with httpx.Client(base_url=url.rstrip("/"), timeout=timeout_s, headers=headers) as client:
        for q in questions:
            body = {"messages": [{"role": "user", "content": q["turns"][0]}], "max_tokens": max_tokens,
                    "temperature": 0}
            start = time.perf_counter()
            resp = client.post("/v1/chat/completions", json=body)
            elapsed = time.perf_counter() - start
            if resp.status_code != 200:
                raise RuntimeError(f"{url} answered {resp.status_code}: {resp.text[:300]}")
            data = resp.json()
            osd = data.get("osd") or {}
            tokens = data["usage"]["completion_tokens"]
            results.append({"question_id": q["question_id"], "category": q["category"], "tokens": tokens,
                            "seconds": elapsed, "tokens_per_s": tokens / elapsed if elapsed else 0.0,
                            "draft_version": osd.get("draft_version"), "alpha_hat": osd.get("alpha_hat"),
                            "mean_acceptance_length": osd.get("mean_acceptance_length"),
                            "target_forwards": osd.get("target_forwards"),
                            "accepted_by_source": osd.get("accepted_by_source") or {}})
    return results


def cmd_replay(args) -> int:
    rows = load_questions(args.data, args.category)
    questions = spread_across_categories(rows, args.limit) if not args.category else rows[: args.limit]
    print(f"replaying {len(questions)} questions to {args.url} ...")
    for r in replay(args.url, questions, args.max_tokens):
        alpha = f"{r['alpha_hat']:.3f}" if r["alpha_hat"] is not None else "n/a"
        per_forward = r["tokens"] / r["target_forwards"] if r["target_forwards"] else 1.0
        src = r["accepted_by_source"]
        print(f"  {r['category']:<15} {r['tokens']:4d} tokens {r['tokens_per_s']:6.1f} tok/s  "
              f"{per_forward:.2f} tok/fwd  accepted from suffix {src.get('suffix', 0) + src.get('both', 0)}, "
              f"draft {src.get('draft', 0) + src.get('both', 0)}  draft v{r['draft_version']}  α̂ {alpha}")
    return 0


def add_replay_args(parser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the osd endpoint (without /v1)")
    parser.add_argument("--limit", type=int, default=8, help="questions to send")
    parser.add_argument("--category", action="append", help="only this category (repeatable)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--data", default=None, help="questions JSONL (default: the vendored Spec-Bench questions)")
    parser.set_defaults(func=cmd_replay)
