"""Summaries, Markdown and the SVG chart of perf/compare."""

from common import median

# workload -> list of (metric key, label, unit, higher_is_better)
METRICS = {
    "bulk-up": [("mb_per_s", "MB/s", True), ("cpu_s_per_gb", "tunnel CPU s/GB", False)],
    "bulk-down": [("mb_per_s", "MB/s", True), ("cpu_s_per_gb", "tunnel CPU s/GB", False)],
    "bulk-10x": [("mb_per_s", "MB/s", True), ("cpu_s_per_gb", "tunnel CPU s/GB", False)],
    "rr-1": [("rps", "round trips/s", True), ("p50_us", "p50 us", False), ("p99_us", "p99 us", False)],
    "rr-64": [("rps", "round trips/s", True), ("p50_us", "p50 us", False), ("p99_us", "p99 us", False)],
    "connrate": [("rps", "conn/s", True), ("p99_us", "p99 us", False)],
    "hold": [("alive", "alive", True), ("rss_per_conn_kib", "RSS KiB/conn", False)],
}
HEADLINE = [("bulk-up", "mb_per_s"), ("bulk-down", "mb_per_s"), ("bulk-10x", "mb_per_s"),
            ("bulk-10x", "cpu_s_per_gb"), ("rr-1", "p50_us"), ("rr-64", "rps"), ("connrate", "rps"),
            ("hold", "rss_per_conn_kib")]


def metric(row, key):
    rep = row.get("report") or {}
    lat = rep.get("latency_us") or {}
    if key in ("mb_per_s", "rps"):
        return rep.get(key)
    if key == "p50_us":
        return lat.get("p50")
    if key == "p99_us":
        return lat.get("p99")
    if key == "alive":
        return rep.get("requests")
    return row.get(key)


def summarize(result):
    out = {}
    for s in result["systems"]:
        for w, ms in METRICS.items():
            rows = [r for r in result["runs"] if r["system"] == s and r["workload"] == w]
            if not rows:
                continue
            ok = [r for r in rows if not r.get("error")]
            d = {"runs": len(rows), "failed": len(rows) - len(ok)}
            for key, _, _ in ms:
                vals = [v for v in (metric(r, key) for r in ok) if v is not None]
                if vals:
                    d[key] = {"median": median(vals), "min": min(vals), "max": max(vals)}
            out.setdefault(s, {})[w] = d
    return out


def summarize_http(result):
    out = {}
    rows = result.get("http_runs") or []
    for s in result["systems"]:
        for r in rows:
            if r["system"] != s:
                continue
            key = f"{r['path']} c={r['concurrency']}"
            out.setdefault(s, {}).setdefault(key, []).append(r)
    summ = {}
    for s, cells in out.items():
        for key, rs in cells.items():
            ok = [r for r in rs if not r.get("error") and r.get("rps")]
            d = {"runs": len(rs), "failed": len(rs) - len(ok),
                 "non_2xx_or_errors": sum(r.get("non_2xx_or_errors") or 0 for r in rs)}
            for k in ("rps", "p50_ms", "p99_ms"):
                vals = [r[k] for r in ok if r.get(k) is not None]
                if vals:
                    d[k] = {"median": median(vals), "min": min(vals), "max": max(vals)}
            summ.setdefault(s, {})[key] = d
    # relative to direct, pathologies
    direct = summ.get("direct", {})
    for s, cells in summ.items():
        for key, d in cells.items():
            dd = direct.get(key, {})
            if d.get("rps") and dd.get("rps"):
                d["rps_rel_direct"] = d["rps"]["median"] / dd["rps"]["median"]
            flags = []
            if d.get("p99_ms") and dd.get("p99_ms") and d["p99_ms"]["median"] > 10 * dd["p99_ms"]["median"]:
                flags.append("p99>10x direct")
            if d["failed"] or d["non_2xx_or_errors"]:
                flags.append("errors")
            d["flags"] = flags
        # collapse: RPS drops by >30% from the best lower concurrency, per path
        for path in ("/small", "/large"):
            best = 0
            for c in (1, 8, 64, 256):
                d = cells.get(f"{path} c={c}")
                if not d or not d.get("rps"):
                    continue
                v = d["rps"]["median"]
                if best and v < 0.7 * best:
                    d["flags"].append("RPS collapse")
                best = max(best, v)
    return summ


def fmt(v):
    if v is None:
        return "-"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(d):
    if not d:
        return "-"
    if d["min"] == d["max"]:
        return fmt(d["median"])
    return f"{fmt(d['median'])} ({fmt(d['min'])}–{fmt(d['max'])})"


def short(row):
    if row.get("error"):
        return f"FAILED: {str(row['error'])[:200]}"
    rep = row.get("report") or {}
    lat = rep.get("latency_us") or {}
    s = f"{fmt(rep.get('mb_per_s'))} MB/s, {fmt(rep.get('rps'))} ops/s, p50 {fmt(lat.get('p50'))} us, p99 {fmt(lat.get('p99'))} us"
    if "cpu_s_per_gb" in row:
        s += f", tunnel CPU {row['cpu_s_per_gb']} s/GB"
    if "rss_per_conn_kib" in row:
        s += f", RSS {row['rss_per_conn_kib']} KiB/conn"
    return s


def stamp_md(result):
    st = result["stamp"]
    return (f"commit `{st['commit']}`{' (dirty worktree)' if st.get('dirty_worktree') else ''} · "
            f"kernel {st['kernel']} · {st['cpu_model']} · {st['cores']} cores · {st['date']} · "
            f"{st.get('rustc', '')}" + (f" · TCP congestion control {st['tcp_cc']}" if st.get("tcp_cc") else ""))


def markdown(result, headline_only=False):
    summ, labels = result["summary"], result["labels"]
    L = []
    L.append("# perf/compare results\n")
    L.append(stamp_md(result) + "\n")
    how = ("each workload run through every system back to back (the order flips every round)"
           if result.get("order") == "workload" else "systems interleaved")
    L.append(f"Loopback, {result['rounds']} round(s), {how}; each cell is the median "
             f"(min–max) over rounds.{' QUICK MODE (tiny sizes).' if result['quick'] else ''}\n")
    if result["skipped"]:
        L.append("Skipped: " + "; ".join(f"{k}: {v}" for k, v in result["skipped"].items()) + "\n")
    L.append("## Headline\n")
    heads = [(w, k) for w, k in HEADLINE if any(w in summ.get(s, {}) for s in result["systems"])]
    L.append("| system | " + " | ".join(f"{w} {_name(w, k)}" for w, k in heads) + " |")
    L.append("|---|" + "---|" * len(heads))
    for s in result["systems"]:
        cells = []
        for w, k in heads:
            d = summ.get(s, {}).get(w, {})
            c = cell(d.get(k)) if d else "-"
            if d and d.get("failed"):
                c += f" ⚠{d['failed']} failed"
            cells.append(c)
        L.append(f"| {labels.get(s, s)} | " + " | ".join(cells) + " |")
    L.append("")
    if headline_only:
        return "\n".join(L)
    for w, ms in METRICS.items():
        if not any(w in summ.get(s, {}) for s in result["systems"]):
            continue
        L.append(f"## {w}: `warren-load {' '.join(result['workloads'].get(w, []))}`\n")
        L.append("| system | " + " | ".join(lab for _, lab, _ in ms) + " | failed runs |")
        L.append("|---|" + "---|" * (len(ms) + 1))
        for s in result["systems"]:
            d = summ.get(s, {}).get(w)
            if not d:
                continue
            L.append(f"| {labels.get(s, s)} | " + " | ".join(cell(d.get(k)) for k, _, _ in ms) +
                     f" | {d['failed']}/{d['runs']} |")
        L.append("")
    hs = result.get("http_summary") or {}
    if hs:
        L.append(f"## HTTP matrix: `oha -z {result.get('http_seconds', 3)}s` against `warren-load http`\n")
        L.append("RPS median (min–max), latency p50 / p99 in ms, RPS relative to direct. "
                 "Flags: **RPS collapse** (RPS falls >30% below the best lower concurrency), "
                 "**p99>10x direct**, **errors** (transport errors or non-2xx).\n")
        L.append("| system | cell | RPS | p50 ms | p99 ms | vs direct | flags |")
        L.append("|---|---|---|---|---|---|---|")
        for s in result["systems"]:
            for key, d in (hs.get(s) or {}).items():
                rel = d.get("rps_rel_direct")
                L.append(f"| {labels.get(s, s)} | {key} | {cell(d.get('rps'))} | "
                         f"{fmt((d.get('p50_ms') or {}).get('median'))} | {fmt((d.get('p99_ms') or {}).get('median'))} | "
                         f"{'-' if rel is None else f'{rel:.2f}x'} | {', '.join('**' + f + '**' for f in d.get('flags', []))} |")
        L.append("")
    fails = [r for r in result["runs"] if r.get("error")] + [r for r in result.get("http_runs", []) if r.get("error")]
    if fails:
        L.append("## Failed runs\n")
        for r in fails:
            L.append(f"- {r['system']} {r.get('workload', r.get('path'))} round {r.get('round')}: "
                     f"`{str(r['error'])[:300].replace(chr(10), ' ')}`")
        L.append("")
    L.append("Notes: tunnel CPU = utime+stime of the tunnel server and client processes during the run "
             "(not the load tool or backends). RSS/conn = (peak summed VmRSS while holding − before) / "
             "connections opened. direct and kernel NAT have no tunnel processes.\n")
    return "\n".join(L)


COLORS = ["#7f7f7f", "#bcbd22", "#1f77b4", "#17becf", "#9467bd", "#8c564b", "#d62728", "#ff7f0e"]


def svg(result):
    summ, labels, systems = result["summary"], result["labels"], result["systems"]
    panels = [(w, k) for w, k in HEADLINE if any(summ.get(s, {}).get(w, {}).get(k) for s in systems)]
    hs = result.get("http_summary") or {}
    if hs:
        panels.append(("http", "/small c=64"))
        panels.append(("http", "/large c=64"))
    pw, ph, cols = 380, 230, 3
    rows = (len(panels) + cols - 1) // cols
    W, H = pw * cols + 20, ph * rows + 110
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="10" y="20" font-size="15" font-weight="bold">warren perf/compare (loopback, median with min–max whiskers)</text>',
         f'<text x="10" y="38" fill="#444">{_esc(stamp_md(result).replace("`", ""))}</text>']
    lx = 10
    for i, s in enumerate(systems):
        o.append(f'<rect x="{lx}" y="48" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
                 f'<text x="{lx + 14}" y="57">{_esc(labels.get(s, s))}</text>')
        lx += 14 + 7 * len(labels.get(s, s)) + 12
    for pi, (w, k) in enumerate(panels):
        x0, y0 = 10 + (pi % cols) * pw, 75 + (pi // cols) * ph
        if w == "http":
            title = f"HTTP {k} RPS (higher is better)"
            vals = [(hs.get(s, {}).get(k) or {}).get("rps") for s in systems]
        else:
            better = next(b for kk, _, b in METRICS[w] if kk == k)
            title = f"{w}: {_name(w, k)} ({'higher' if better else 'lower'} is better)"
            vals = [summ.get(s, {}).get(w, {}).get(k) for s in systems]
        o.append(f'<text x="{x0}" y="{y0 + 12}" font-weight="bold">{_esc(title)}</text>')
        top = max([v["max"] for v in vals if v] or [1]) or 1
        bx0, by0, bw_tot, bh = x0 + 5, y0 + 25, pw - 30, ph - 60
        n = max(len(systems), 1)
        bw = bw_tot / n
        o.append(f'<line x1="{bx0}" y1="{by0 + bh}" x2="{bx0 + bw_tot}" y2="{by0 + bh}" stroke="#999"/>')
        for i, v in enumerate(vals):
            bx = bx0 + i * bw + 2
            if not v:
                o.append(f'<text x="{bx}" y="{by0 + bh - 3}" fill="#999">n/a</text>')
                continue
            h = bh * v["median"] / top
            o.append(f'<rect x="{bx:.1f}" y="{by0 + bh - h:.1f}" width="{bw - 4:.1f}" height="{h:.1f}" '
                     f'fill="{COLORS[i % len(COLORS)]}"><title>{_esc(labels.get(systems[i], systems[i]))}: '
                     f'{fmt(v["median"])} ({fmt(v["min"])}–{fmt(v["max"])})</title></rect>')
            cx = bx + (bw - 4) / 2
            y1, y2 = by0 + bh - bh * v["min"] / top, by0 + bh - bh * v["max"] / top
            o.append(f'<line x1="{cx:.1f}" y1="{y1:.1f}" x2="{cx:.1f}" y2="{y2:.1f}" stroke="black"/>')
            o.append(f'<text x="{cx:.1f}" y="{min(by0 + bh - h, y2) - 3:.1f}" text-anchor="middle" font-size="9">'
                     f'{fmt(v["median"])}</text>')
    o.append("</svg>\n")
    return "\n".join(o)


def _esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _name(w, k):
    return next(lab for kk, lab, _ in METRICS[w] if kk == k)
