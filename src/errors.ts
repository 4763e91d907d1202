// Why this file exists: every failure Ferry reports carries a stable machine-readable `code`
// (the table in docs/errors.md mirrors ERROR_CODES below), an operator-readable message, and
// the underlying `cause`. The API serialises these as {code, message}; the CLI maps them to
// exit codes. Add a code here and in docs/errors.md together (a unit test checks they agree).

export const ERROR_CODES = {
  // Request validation (HTTP 400)
  INVALID_ARGUMENT: { status: 400, exit: 2, summary: 'A request field is missing, malformed or out of range.' },
  INVALID_NAME: { status: 400, exit: 2, summary: 'A VM name does not match [a-z0-9][a-z0-9-]{0,62}.' },
  SIZE_OUT_OF_RANGE: { status: 400, exit: 2, summary: 'A memory, disk or CPU size is outside the allowed range.' },
  PATH_OUTSIDE_DATA_DIR: { status: 400, exit: 2, summary: "A file path lies outside the agent's data directory." },
  // Authentication (HTTP 401)
  UNAUTHENTICATED: { status: 401, exit: 4, summary: 'The API token is missing or wrong.' },
  // Lookup (HTTP 404)
  VM_NOT_FOUND: { status: 404, exit: 3, summary: 'No VM has that name on this host.' },
  IMAGE_NOT_FOUND: { status: 404, exit: 3, summary: 'The named guest image is not in the images directory.' },
  NOT_FOUND: { status: 404, exit: 3, summary: 'No such API route.' },
  HOST_NOT_FOUND: { status: 404, exit: 3, summary: 'The named host is not in the trust store (ferry host trusted lists it).' },
  MIGRATION_NOT_FOUND: { status: 404, exit: 3, summary: 'No migration with that id (or for that VM) on this host.' },
  STORE_NOT_FOUND: { status: 404, exit: 3, summary: 'The directory is not a Ferry chunk store (ferry store init creates one).' },
  BACKUP_NOT_FOUND: { status: 404, exit: 3, summary: 'No backup with that id (or id prefix) in the store.' },
  SNAPSHOT_NOT_FOUND: { status: 404, exit: 3, summary: 'The VM has no snapshot with that name.' },
  LAB_NOT_FOUND: { status: 404, exit: 3, summary: 'No WAN lab with that name is up.' },
  // Conflicts with current state (HTTP 409)
  VM_EXISTS: { status: 409, exit: 5, summary: 'A VM with that name already exists.' },
  VM_RUNNING: { status: 409, exit: 5, summary: 'The VM is running (or paused) and the operation needs it stopped.' },
  VM_NOT_RUNNING: { status: 409, exit: 5, summary: 'The operation needs a running (or paused) VM.' },
  VM_BUSY: { status: 409, exit: 5, summary: 'Another operation on this VM is in progress.' },
  AGENT_ALREADY_RUNNING: { status: 409, exit: 5, summary: 'Another agent already owns this data directory.' },
  LAB_EXISTS: { status: 409, exit: 5, summary: 'A WAN lab with that name is already up.' },
  MIGRATION_REFUSED: { status: 409, exit: 5, summary: 'The destination refused the migration at Begin; details.problems lists every reason.' },
  MIGRATION_SWITCHING: { status: 409, exit: 5, summary: 'The migration is at or past its switchover and can no longer be cancelled.' },
  MIGRATION_CANCELLED: { status: 409, exit: 5, summary: 'The migration was cancelled; the VM runs at the source.' },
  STORE_EXISTS: { status: 409, exit: 5, summary: 'The directory already holds a Ferry chunk store.' },
  STORE_LOCKED: { status: 409, exit: 5, summary: 'Another live process (a backup, prune or gc) holds the store\'s writer lock.' },
  SNAPSHOT_EXISTS: { status: 409, exit: 5, summary: 'The VM already has a snapshot with that name.' },
  AGENT_NOT_INITIALIZED: { status: 409, exit: 5, summary: 'The data directory has no identity: run `ferry agent init`.' },
  // Failures of components Ferry drives (HTTP 500/502/504)
  QEMU_FAILED: { status: 502, exit: 6, summary: 'QEMU refused a command or exited while starting.' },
  QMP_ERROR: { status: 502, exit: 6, summary: 'QEMU answered a QMP command with an error.' },
  QMP_TIMEOUT: { status: 504, exit: 6, summary: 'QEMU did not answer a QMP command in time.' },
  QMP_DISCONNECTED: { status: 502, exit: 6, summary: 'The QMP connection closed (QEMU exited or crashed).' },
  COMMAND_FAILED: { status: 500, exit: 6, summary: 'An external program (qemu-img, apt-get, debootstrap, …) failed.' },
  TRANSPORT_PROTOCOL: { status: 502, exit: 6, summary: 'A transport peer sent a malformed, corrupted or unexpected frame.' },
  TRANSPORT_CLOSED: { status: 502, exit: 6, summary: 'The transport session was closed (by the peer, or after its resume limit).' },
  TRANSPORT_TIMEOUT: { status: 504, exit: 7, summary: 'A transport peer could not be reached in time.' },
  PEER_UNTRUSTED: { status: 403, exit: 4, summary: "A transport peer's certificate is not pinned in the trust store (ferry host trust)." },
  MIGRATION_FAILED: { status: 502, exit: 6, summary: 'The migration failed and was rolled back: the VM runs at the source.' },
  VERIFY_FAILED: { status: 502, exit: 6, summary: "A block on the destination did not match the source's after the copy." },
  STORE_CORRUPT: { status: 500, exit: 6, summary: 'A chunk (named in the message) is missing or does not match its id; the store index is inconsistent.' },
  STORE_FULL: { status: 507, exit: 6, summary: "The store's file system is full; nothing was committed and earlier backups are intact." },
  STORE_WRONG_KEY: { status: 403, exit: 4, summary: 'The key file is missing, malformed, or not the key of this encrypted store.' },
  NBD_ERROR: { status: 502, exit: 6, summary: 'An NBD server refused a request or broke the protocol.' },
  AGENT_UNREACHABLE: { status: 503, exit: 7, summary: 'The CLI could not reach the agent.' },
  SETUP_REQUIRED: { status: 500, exit: 8, summary: 'Required Debian packages are missing and cannot be installed (not root).' },
  TIMEOUT: { status: 504, exit: 7, summary: 'Ferry gave up waiting for something (named in the message) within its time limit.' },
  INTERNAL: { status: 500, exit: 1, summary: 'A bug: an unexpected internal error.' },
} as const;

export type ErrorCode = keyof typeof ERROR_CODES;

export class FerryError extends Error {
  readonly code: ErrorCode;
  readonly details: Record<string, unknown> | undefined;

  constructor(code: ErrorCode, message: string, opts: { cause?: unknown; details?: Record<string, unknown> } = {}) {
    super(message, opts.cause === undefined ? undefined : { cause: opts.cause });
    this.name = 'FerryError';
    this.code = code;
    this.details = opts.details;
  }

  get status(): number {
    return ERROR_CODES[this.code].status;
  }

  get exitCode(): number {
    return ERROR_CODES[this.code].exit;
  }

  toJSON(): { code: ErrorCode; message: string; details?: Record<string, unknown> } {
    return this.details ? { code: this.code, message: this.message, details: this.details } : { code: this.code, message: this.message };
  }
}

export function isErrorCode(s: unknown): s is ErrorCode {
  return typeof s === 'string' && Object.prototype.hasOwnProperty.call(ERROR_CODES, s);
}

/** Wraps anything thrown into a FerryError (unknown errors become INTERNAL, keeping the cause). */
export function asFerryError(e: unknown): FerryError {
  if (e instanceof FerryError) return e;
  const msg = e instanceof Error ? e.message : String(e);
  return new FerryError('INTERNAL', msg, { cause: e });
}
