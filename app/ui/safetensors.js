// Reading a .safetensors file: an 8-byte little-endian header length, a JSON header naming each tensor's
// dtype, shape and byte range, then the raw little-endian data.

const ARRAYS = { F64: Float64Array, F32: Float32Array, I64: BigInt64Array, I32: Int32Array, I16: Int16Array,
  I8: Int8Array, U8: Uint8Array };

/** {name: {dtype, shape, values}} with values a plain array of numbers, for every tensor or only those in
 * `names` (the rest, such as a large directions matrix, are not decoded); throws on a malformed file. */
export function parseSafetensors(buffer, names = null) {
  if (buffer.byteLength < 8) throw new Error("not a safetensors file (too short)");
  const headerLength = Number(new DataView(buffer).getBigUint64(0, true));
  if (8 + headerLength > buffer.byteLength) throw new Error("not a safetensors file (header overruns the data)");
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, headerLength)));
  const base = 8 + headerLength;
  const tensors = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__" || (names && !names.includes(name))) continue;
    const Array_ = ARRAYS[entry.dtype];
    if (!Array_) throw new Error(`tensor ${name}: unsupported dtype ${entry.dtype}`);
    const [begin, end] = entry.data_offsets;
    if (begin < 0 || end < begin || base + end > buffer.byteLength) throw new Error(`tensor ${name}: bad byte range`);
    // slice() copies to an aligned buffer: typed arrays need offsets that are multiples of their element size.
    const typed = new Array_(buffer.slice(base + begin, base + end));
    tensors[name] = { dtype: entry.dtype, shape: entry.shape, values: Array.from(typed, Number) };
  }
  return tensors;
}
