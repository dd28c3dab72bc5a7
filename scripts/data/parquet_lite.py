"""A minimal Parquet writer (stdlib only): one row group, required UTF-8 string columns, one
PLAIN-encoded uncompressed data page (v1) per column, and the Thrift-compact footer. Enough for
small shipped datasets; readers (the `parquet` crate, pyarrow) read it as any Parquet file."""
import struct


class _Thrift:
    """Thrift compact protocol, the subset a Parquet footer needs."""

    I32, I64, BINARY, LIST, STRUCT = 5, 6, 8, 9, 12

    def __init__(self):
        self.buf = bytearray()
        self.last = [0]

    def varint(self, n):
        while True:
            b = n & 0x7F
            n >>= 7
            if n:
                self.buf.append(b | 0x80)
            else:
                self.buf.append(b)
                return

    def zigzag(self, n):
        self.varint((n << 1) ^ (n >> 63))

    def field(self, fid, ftype):
        delta = fid - self.last[-1]
        if 0 < delta <= 15:
            self.buf.append((delta << 4) | ftype)
        else:
            self.buf.append(ftype)
            self.zigzag(fid)
        self.last[-1] = fid

    def i32(self, fid, v):
        self.field(fid, self.I32)
        self.zigzag(v)

    def i64(self, fid, v):
        self.field(fid, self.I64)
        self.zigzag(v)

    def binary(self, fid, b):
        self.field(fid, self.BINARY)
        self.varint(len(b))
        self.buf += b

    def begin(self, fid):
        self.field(fid, self.STRUCT)
        self.last.append(0)

    def end(self):
        self.buf.append(0)
        self.last.pop()

    def list_header(self, fid, etype, n):
        self.field(fid, self.LIST)
        if n < 15:
            self.buf.append((n << 4) | etype)
        else:
            self.buf.append(0xF0 | etype)
            self.varint(n)

    def list_struct_begin(self):
        self.last.append(0)


def write_strings(path, names, rows):
    """Write `rows` (lists of str, one per column of `names`) as a Parquet file."""
    out = bytearray(b"PAR1")
    chunks = []
    for c, name in enumerate(names):
        data = bytearray()
        for r in rows:
            v = r[c].encode("utf-8")
            data += struct.pack("<I", len(v)) + v
        h = _Thrift()  # PageHeader
        h.i32(1, 0)  # type DATA_PAGE
        h.i32(2, len(data))  # uncompressed_page_size
        h.i32(3, len(data))  # compressed_page_size
        h.begin(5)  # data_page_header
        h.i32(1, len(rows))  # num_values
        h.i32(2, 0)  # encoding PLAIN
        h.i32(3, 3)  # definition_level_encoding RLE
        h.i32(4, 3)  # repetition_level_encoding RLE
        h.end()
        h.buf.append(0)
        offset = len(out)
        out += h.buf + data
        chunks.append((name, offset, len(h.buf) + len(data)))
    m = _Thrift()  # FileMetaData
    m.i32(1, 1)  # version
    m.list_header(2, _Thrift.STRUCT, len(names) + 1)  # schema
    for k, el in enumerate([None] + list(names)):
        m.list_struct_begin()
        if el is None:
            m.binary(4, b"schema")
            m.i32(5, len(names))  # num_children
        else:
            m.i32(1, 6)  # type BYTE_ARRAY
            m.i32(3, 0)  # repetition_type REQUIRED
            m.binary(4, el.encode())
            m.i32(6, 0)  # converted_type UTF8
        m.end()
    m.i64(3, len(rows))  # num_rows
    m.list_header(4, _Thrift.STRUCT, 1)  # row_groups
    m.list_struct_begin()
    m.list_header(1, _Thrift.STRUCT, len(chunks))  # columns
    for name, offset, size in chunks:
        m.list_struct_begin()
        m.i64(2, offset)  # file_offset
        m.begin(3)  # meta_data: ColumnMetaData
        m.i32(1, 6)  # type BYTE_ARRAY
        m.list_header(2, _Thrift.I32, 2)  # encodings
        m.zigzag(0)
        m.zigzag(3)
        m.list_header(3, _Thrift.BINARY, 1)  # path_in_schema
        m.varint(len(name.encode()))
        m.buf += name.encode()
        m.i32(4, 0)  # codec UNCOMPRESSED
        m.i64(5, len(rows))  # num_values
        m.i64(6, size)  # total_uncompressed_size
        m.i64(7, size)  # total_compressed_size
        m.i64(9, offset)  # data_page_offset
        m.end()
        m.end()
    m.i64(2, sum(s for _, _, s in chunks))  # total_byte_size
    m.i64(3, len(rows))  # num_rows
    m.end()
    m.binary(6, b"lockstep scripts/data/parquet_lite.py")  # created_by
    m.buf.append(0)
    out += m.buf + struct.pack("<I", len(m.buf)) + b"PAR1"
    with open(path, "wb") as f:
        f.write(out)
