"""SQL on the app's own database (`wit/sql.wit`): SQLite by default, PostgreSQL when the host
has one; parameters are positional (`$1`, `$2`, …) on both.

    rows = sql.query("SELECT id, size FROM files WHERE user_id = $1", [user_id])
    for row in rows:
        row["id"], row.size, row[1]
    changed = sql.execute("DELETE FROM files WHERE id = $1", [file_id])
    with sql.transaction() as tx:       # committed at the end, rolled back on an exception
        tx.execute(...)
"""

from host_capabilities._base import HostCapabilityError, bindings, raising

_wit = bindings("sql")

# The range of the WIT `s64`.
_S64 = range(-(1 << 63), 1 << 63)


class SqlError(HostCapabilityError):
    """The database's answer other than success."""


class DatabaseError(SqlError):
    """The database refused the statement (syntax, constraint, permission, …). `code` is the
    SQLSTATE on PostgreSQL, the extended result code on SQLite; `constraint` the one violated,
    when the database says."""

    def __init__(self, code: "str | None", message: str, constraint: "str | None"):
        super().__init__(message)
        self.code, self.message, self.constraint = code, message, constraint


class Unavailable(SqlError):
    """No connection within the acquire timeout, or the connection was lost."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnsupportedType(SqlError):
    """A column of a type the interface does not carry; cast it in SQL."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class TooLarge(SqlError):
    """The result is larger than the host passes to a guest at once; page it."""

    def __init__(self, size: int):
        super().__init__(f"the result is too large ({size} bytes); page it")
        self.size = size


class TransactionFinished(SqlError):
    """The transaction was already committed or rolled back."""

    def __init__(self):
        super().__init__("the transaction was already committed or rolled back")


_ERRORS = {
    _wit.SqlError_Database: lambda case: DatabaseError(
        case.value.code, case.value.message, case.value.constraint
    ),
    _wit.SqlError_Unavailable: lambda case: Unavailable(case.value),
    _wit.SqlError_UnsupportedType: lambda case: UnsupportedType(case.value),
    _wit.SqlError_TooLarge: lambda case: TooLarge(case.value),
    _wit.SqlError_TransactionFinished: lambda case: TransactionFinished(),
}


class Row:
    """One row: by index (`row[0]`), by column name (`row["id"]`, `row.get("id")`), or as an
    attribute (`row.id`); `dict(row.items())` or `row.as_dict()` for a dict."""

    __slots__ = ("_index", "_values")

    def __init__(self, index: dict, values: tuple):
        self._index = index
        self._values = values

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._values[self._index[key]]
        return self._values[key]

    def __getattr__(self, name: str):
        try:
            return self._values[self._index[name]]
        except KeyError:
            raise AttributeError(f"the row has no column {name!r}") from None

    def get(self, column: str, default=None):
        index = self._index.get(column)
        return default if index is None else self._values[index]

    def keys(self) -> list:
        return list(self._index)

    def values(self) -> tuple:
        return self._values

    def items(self) -> list:
        return list(zip(self._index, self._values))

    def as_dict(self) -> dict:
        return dict(zip(self._index, self._values))

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other) -> bool:
        if isinstance(other, Row):
            return self._values == other._values and list(self._index) == list(other._index)
        return self._values == other

    def __repr__(self) -> str:
        return f"Row({', '.join(f'{name}={value!r}' for name, value in self.items())})"


class Rows(list):
    """The rows of a query, a list of `Row`s, with the result's `columns`."""

    def __init__(self, columns: list, rows: list):
        # A name given twice (`SELECT a.id, b.id`) is found at its first place.
        index = {}
        for position, name in enumerate(columns):
            index.setdefault(name, position)
        super().__init__(Row(index, tuple(map(_from_value, values))) for values in rows)
        self.columns = list(columns)


def query(statement: str, params=()) -> Rows:
    """Runs a statement that returns rows."""
    with raising(_ERRORS):
        return _rows(_wit.query(statement, _values(params)))


def query_one(statement: str, params=()) -> "Row | None":
    """The first row a statement returns, or None."""
    rows = query(statement, params)
    return rows[0] if rows else None


def execute(statement: str, params=()) -> int:
    """Runs a statement; returns the number of rows it changed."""
    with raising(_ERRORS):
        return _wit.execute(statement, _values(params))


class Transaction:
    """A transaction on one connection, as a context manager: committed when the `with` block
    ends, rolled back when it raises (or when dropped unfinished)."""

    def __init__(self):
        with raising(_ERRORS):
            self._wit = _wit.begin()
        self._finished = False

    def query(self, statement: str, params=()) -> Rows:
        with raising(_ERRORS):
            return _rows(self._wit.query(statement, _values(params)))

    def query_one(self, statement: str, params=()) -> "Row | None":
        rows = self.query(statement, params)
        return rows[0] if rows else None

    def execute(self, statement: str, params=()) -> int:
        with raising(_ERRORS):
            return self._wit.execute(statement, _values(params))

    def commit(self) -> None:
        with raising(_ERRORS):
            self._wit.commit()
        self._finished = True

    def rollback(self) -> None:
        with raising(_ERRORS):
            self._wit.rollback()
        self._finished = True

    def __enter__(self) -> "Transaction":
        return self

    def __exit__(self, exc_type, exc_value, traceback) -> None:
        try:
            if not self._finished:
                if exc_type is None:
                    self.commit()
                else:
                    # The block's exception is the one to see; a failed rollback is the
                    # host's too (it rolls back a transaction dropped unfinished).
                    try:
                        self.rollback()
                    except SqlError:
                        pass
        finally:
            self._wit.__exit__(None, None, None)


def transaction() -> Transaction:
    """Begins a transaction (use it in `with`)."""
    return Transaction()


begin = transaction


def _rows(rows) -> Rows:
    return Rows(rows.columns, rows.rows)


def _values(params) -> list:
    if isinstance(params, (str, bytes)):
        raise TypeError("params is a list of values, not one string or bytes")
    return [_to_value(value) for value in params]


def _to_value(value):
    # bool first: it is an int too.
    if value is None:
        return _wit.Value_Null()
    if isinstance(value, bool):
        return _wit.Value_Boolean(value)
    if isinstance(value, int):
        if value not in _S64:
            raise OverflowError(f"{value} does not fit a 64-bit signed SQL integer")
        return _wit.Value_Integer(value)
    if isinstance(value, float):
        return _wit.Value_Real(value)
    if isinstance(value, str):
        return _wit.Value_Text(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _wit.Value_Blob(bytes(value))
    raise TypeError(
        f"a SQL parameter is None, int, float, str, bytes or bool, not {type(value).__name__}"
    )


def _from_value(value):
    return None if isinstance(value, _wit.Value_Null) else value.value
