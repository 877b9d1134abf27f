import hashlib, hmac, struct, sys

def object_tag(key: bytes, parts: list[bytes]) -> str:
    macs = [hmac.new(key, struct.pack(">I", n) + part, hashlib.sha256).digest()
            for n, part in enumerate(parts, start=1)]
    message = b"host-hmac-v1" + struct.pack(">I", len(parts))
    message += b"".join(struct.pack(">Q", len(part)) + mac for part, mac in zip(parts, macs))
    return hmac.new(key, message, hashlib.sha256).hexdigest()

if __name__ == "__main__":  # object_tag.py KEY_HEX PART_SIZE FILE
    data = open(sys.argv[3], "rb").read()
    size = int(sys.argv[2])
    print(object_tag(bytes.fromhex(sys.argv[1]), [data[i:i + size] for i in range(0, len(data), size)]))
