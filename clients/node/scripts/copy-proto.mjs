// Copies the contract (../../proto) and the vendored health proto into dist/proto, where the
// client loads them at run time, so the built package carries the exact proto it was built from.
import { cpSync, mkdirSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(pkg, "dist", "proto");
mkdirSync(out, { recursive: true });
cpSync(join(pkg, "..", "..", "proto", "eventbus"), join(out, "eventbus"), { recursive: true });
cpSync(join(pkg, "proto", "grpc"), join(out, "grpc"), { recursive: true });
