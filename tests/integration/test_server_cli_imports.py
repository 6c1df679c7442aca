"""``posguard-server import``: counts in words, one file name per message, and exit status 3 when the file
did not go in whole (rows rejected, outcomes of transactions not stored)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from .conftest import Cli

HEADER = "transaction_id,customer_ref,timestamp,amount,currency,merchant_id\n"


def _write(path: Path, *rows: str, header: str = HEADER) -> Path:
    path.write_text(header + "".join(row + "\n" for row in rows))
    return path


def test_one_row_reads_as_one_row(cli: Cli, tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    file = _write(tmp_path / "one.csv", "t1,alice,2024-05-01T10:00:00Z,12.50,EUR,m1")
    done = cli(*data, "import", "transactions", str(file))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(
        "1 row read, 1 new, 0 already stored; 1 customer created, 1 profile rebuilt in "
    ), done.stdout

    outcomes = _write(tmp_path / "outcomes.csv", "t1,FRAUD", header="transaction_id,outcome\n")
    matched = cli(*data, "import", "outcomes", str(outcomes))
    assert matched.returncode == 0, matched.stderr
    assert matched.stdout == "1 outcome read, 1 matched stored transactions\n"


def test_rejected_rows_are_named_by_line_and_exit_3(cli: Cli, tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    file = _write(
        tmp_path / "mixed.csv",
        "t1,alice,2024-05-01T10:00:00Z,12.50,EUR,m1",
        "t2,alice,9999-12-31T00:00:00Z,12.50,EUR,m1",  # a placeholder time ScoreTransaction refuses
        "t3,bob,2024-05-02T10:00:00Z,7.00,EUR,m2",
    )
    done = cli(*data, "import", "transactions", str(file))
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("3 rows read, 2 new, 0 already stored, 1 rejected; 2 customers created")
    problems = done.stderr.splitlines()
    assert problems, done.stderr
    assert problems[0].startswith("mixed.csv: line 3: timestamp")
    assert all(line.count("mixed.csv") == 1 for line in problems), problems
    assert "1 row rejected" in done.stderr
    assert "Traceback" not in done.stderr


def test_outcomes_of_unknown_transactions_exit_3(cli: Cli, tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    file = _write(tmp_path / "one.csv", "t1,alice,2024-05-01T10:00:00Z,12.50,EUR,m1")
    assert cli(*data, "import", "transactions", str(file)).returncode == 0
    outcomes = _write(
        tmp_path / "late.csv", "t1,FRAUD", "t8,FRAUD", "t9,LEGITIMATE", header="transaction_id,outcome\n"
    )
    done = cli(*data, "import", "outcomes", str(outcomes))
    assert done.returncode == 3
    assert done.stdout == "3 outcomes read, 1 matched stored transactions\n"
    assert done.stderr == "late.csv: 2 outcomes matched no stored transaction\n"


def test_an_unreadable_file_fails_naming_it_once(cli: Cli, tmp_path: Path) -> None:
    data = ("--data-dir", str(tmp_path / "data"))
    broken = _write(tmp_path / "broken.csv", "t1,alice", header="transaction_id,customer_ref\n")
    done = cli(*data, "import", "transactions", str(broken))
    assert done.returncode == 1
    assert done.stderr.count("broken.csv") == 1, done.stderr
    assert "missing columns" in done.stderr
    not_outcomes = _write(tmp_path / "nothing.csv", "t1", header="transaction_id\n")
    done = cli(*data, "import", "outcomes", str(not_outcomes))
    assert done.returncode == 1
    assert done.stderr.count("nothing.csv") == 1, done.stderr
