"""Reads a skillsync database the way reporting users do, with DuckDB's sqlite
extension and with Datasette, and prints what each client saw as JSON.

    python check_readers.py DB METADATA_YAML [SQL_FOR_DUCKDB ...]

Every table and view listed in sqlite_master is read by both clients (count
and the first rows); the extra SQL arguments run in DuckDB against the
database attached as `s`. The Datasette part loads the shipped metadata and
reads each table and view, its facets and every canned query. Exit 0 with
the JSON on stdout; a client that fails to read something reports the error
in the JSON (the Rust test decides what is a failure).
Used by tests/it/reporting.rs; the venv comes from scripts/reporting-venv.sh.
"""

import asyncio
import json
import pathlib
import sqlite3
import sys
import tempfile


def objects(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return con.execute(
            "SELECT name, type FROM sqlite_master WHERE type IN ('table', 'view') "
            "AND name NOT LIKE 'sqlite_%' ORDER BY name"
        ).fetchall()
    finally:
        con.close()


def read_with_duckdb(db, names, queries):
    import duckdb
    import duckdb_extension_sqlite

    ext = (
        pathlib.Path(duckdb_extension_sqlite.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "sqlite.duckdb_extension"
    )
    out = {"version": duckdb.__version__, "objects": {}, "queries": []}
    with tempfile.TemporaryDirectory() as ext_dir:
        con = duckdb.connect()
        # The offline install: from the wheel's file, no download.
        con.execute(f"SET extension_directory = '{ext_dir}'")
        con.execute(f"INSTALL '{ext}'")
        con.execute("LOAD sqlite")
        con.execute(f"ATTACH '{db}' AS s (TYPE sqlite, READ_ONLY)")
        for name, _ in names:
            try:
                n = con.execute(f'SELECT count(*) FROM s."{name}"').fetchone()[0]
                con.execute(f'SELECT * FROM s."{name}" LIMIT 5').fetchall()
                types = con.execute(f'DESCRIBE SELECT * FROM s."{name}"').fetchall()
                out["objects"][name] = {"rows": n, "types": {c[0]: c[1] for c in types}}
            except Exception as e:  # reported, judged by the test
                out["objects"][name] = {"error": str(e)[:2000]}
        for sql in queries:
            try:
                rows = con.execute(sql).fetchall()
                out["queries"].append({"rows": [[v for v in r] for r in rows]})
            except Exception as e:
                out["queries"].append({"error": str(e)[:2000]})
    return out


async def read_with_datasette(db, names, metadata_path):
    import yaml
    from datasette.app import Datasette

    metadata = yaml.safe_load(pathlib.Path(metadata_path).read_text())
    ds = Datasette([db], metadata=metadata)
    await ds.invoke_startup()
    name = pathlib.Path(db).stem
    out = {"database": name, "objects": {}, "queries": {}}
    for obj, _ in names:
        r = await ds.client.get(f"/{name}/{obj}.json?_size=5")
        entry = {"status": r.status_code}
        if r.status_code == 200:
            body = r.json()
            entry["facets"] = sorted((body.get("facet_results") or {}).keys())
        else:
            entry["error"] = r.text[:2000]
        out["objects"][obj] = entry
    canned = metadata["databases"].get(name, {}).get("queries", {})
    for q, spec in canned.items():
        params = "&".join(f"{p}=x" for p in spec.get("params", []))
        r = await ds.client.get(f"/{name}/{q}.json?_shape=array&{params}")
        entry = {"status": r.status_code}
        if r.status_code != 200:
            entry["error"] = r.text[:2000]
        else:
            entry["rows"] = len(r.json())
        out["queries"][q] = entry
    return out


def main():
    db, metadata = sys.argv[1], sys.argv[2]
    names = objects(db)
    result = {
        "objects": [n for n, _ in names],
        "duckdb": read_with_duckdb(db, names, sys.argv[3:]),
        "datasette": asyncio.run(read_with_datasette(db, names, metadata)),
    }
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
