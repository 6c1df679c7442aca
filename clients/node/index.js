'use strict';
// A small client for the posguard gRPC API. The contract is read from proto/posguard/v1 when the module
// loads (no generated code), so it can never drift from the .proto files it ships next to.

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');
const googleProtoFiles = require('google-proto-files');
const healthCheck = require('grpc-health-check');

const DEFAULT_TARGET = '127.0.0.1:50051';
const DEFAULT_TIMEOUT_MS = 5000;
const DEFAULT_PROTO_ROOT = path.resolve(__dirname, '..', '..', 'proto');
const DETAILS_KEY = 'grpc-status-details-bin';
const POSGUARD_FILES = ['common.proto', 'customer_ids.proto', 'risk.proto', 'admin.proto'].map(
  (name) => `posguard/v1/${name}`,
);
// google-proto-files ships the whole googleapis tree; its include root is the folder above google/.
const GOOGLE_ROOT = path.dirname(googleProtoFiles.getProtoPath());

// camelCase fields (JavaScript style); int64 as strings so amounts and counts never lose precision;
// enums by name; every field present in answers; oneofs name the member that is set.
const LOADER_OPTIONS = { keepCase: false, longs: String, enums: String, defaults: true, oneofs: true };

// Names of the canonical status codes by number, e.g. 3 -> 'INVALID_ARGUMENT'. grpc.status is a
// TypeScript enum that also maps numbers back to names; only its name -> number entries are used.
const CODE_NAMES = Object.fromEntries(
  Object.entries(grpc.status)
    .filter(([, code]) => typeof code === 'number')
    .map(([name, code]) => [code, name]),
);

// Retry UNAVAILABLE with backoff, as the Python client does. Safe because every mutating request carries
// a request_id chosen once per call (or, for scoring, the transaction id), so a resent request is
// recognised by the server as the same one. Streams and key creation are left out, as in Python.
const SERVICE_CONFIG = JSON.stringify({
  methodConfig: [
    {
      name: ['posguard.v1.CustomerIds', 'posguard.v1.Risk', 'posguard.v1.Admin'].map((service) => ({
        service,
      })),
      retryPolicy: {
        maxAttempts: 4,
        initialBackoff: '0.05s',
        maxBackoff: '1s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
    {
      name: [
        { service: 'posguard.v1.Admin', method: 'CreateApiKey' },
        { service: 'posguard.v1.Risk', method: 'ScoreTransactions' },
      ],
    },
  ],
});

const definitions = new Map();

/** The loaded services (posguard.v1 and grpc.health.v1) for one proto root, loaded once. */
function loadDefinitions(protoRoot) {
  let loaded = definitions.get(protoRoot);
  if (loaded === undefined) {
    const posguard = protoLoader.loadSync(POSGUARD_FILES, { ...LOADER_OPTIONS, includeDirs: [protoRoot] });
    const health = protoLoader.loadSync(healthCheck.protoPath, LOADER_OPTIONS);
    loaded = { ...posguard, ...health };
    definitions.set(protoRoot, loaded);
  }
  return loaded;
}

let statusTypes;

/** google.rpc.Status and its detail messages, decoded with protobufjs (proto-loader only does services). */
function loadStatusTypes() {
  if (statusTypes === undefined) {
    const root = new protobuf.Root();
    root.resolvePath = (_origin, target) => path.join(GOOGLE_ROOT, target);
    root.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
    statusTypes = {
      status: root.lookupType('google.rpc.Status'),
      byName: (name) => root.lookup(name),
    };
  }
  return statusTypes;
}

/** An error from a posguard call: the gRPC code plus what the server put in google.rpc.Status details. */
class PosguardError extends Error {
  constructor(code, message, { reason = '', metadata = {}, fieldViolations = [], cause } = {}) {
    const codeName = CODE_NAMES[code] ?? 'UNKNOWN';
    super(`${codeName}${reason ? ` (${reason})` : ''}: ${message}`, cause ? { cause } : undefined);
    this.name = 'PosguardError';
    this.code = code;
    this.codeName = codeName;
    this.details = message;
    this.reason = reason;
    this.metadata = metadata;
    this.fieldViolations = fieldViolations;
  }

  toJSON() {
    return {
      code: this.codeName,
      reason: this.reason,
      message: this.details,
      metadata: this.metadata,
      fieldViolations: this.fieldViolations,
    };
  }
}

/** Turns what grpc-js gave a callback into a PosguardError, reading the rich status from the trailers. */
function fromServiceError(error) {
  const code = typeof error.code === 'number' ? error.code : grpc.status.UNKNOWN;
  const message = error.details ?? error.message ?? '';
  const found = { reason: '', metadata: {}, fieldViolations: [], cause: error };
  const raw = error.metadata ? error.metadata.get(DETAILS_KEY) : [];
  if (raw.length > 0 && Buffer.isBuffer(raw[0])) {
    const types = loadStatusTypes();
    let status;
    try {
      status = types.status.decode(raw[0]);
    } catch {
      status = undefined; // a trailer that does not parse is not posguard's: keep the plain status
    }
    // Details that disagree with the status line were not written by posguard: ignore them.
    if (status !== undefined && status.code === code) {
      for (const detail of status.details) {
        const typeName = detail.type_url.slice(detail.type_url.lastIndexOf('/') + 1);
        if (typeName === 'google.rpc.ErrorInfo') {
          const info = types.byName(typeName).decode(detail.value);
          found.reason = info.reason;
          found.metadata = { ...info.metadata };
        } else if (typeName === 'google.rpc.BadRequest') {
          const bad = types.byName(typeName).decode(detail.value);
          for (const v of bad.field_violations) {
            found.fieldViolations.push({ field: v.field, description: v.description });
          }
        }
      }
    }
  }
  return new PosguardError(code, message, found);
}

function readIfGiven(file) {
  return file === undefined || file === null ? null : fs.readFileSync(file);
}

function channelCredentials(options) {
  if (options.credentials) return options.credentials;
  const tls = options.tls;
  if (!tls) return grpc.credentials.createInsecure();
  const config = tls === true ? {} : tls;
  if ((config.certFile == null) !== (config.keyFile == null)) {
    throw new TypeError('tls.certFile and tls.keyFile must be given together');
  }
  return grpc.credentials.createSsl(
    readIfGiven(config.caFile),
    readIfGiven(config.keyFile),
    readIfGiven(config.certFile),
  );
}

/** A google.protobuf.Timestamp for a Date (or milliseconds since the epoch). */
function toTimestamp(value) {
  const given = value instanceof Date ? value.getTime() : value;
  if (!Number.isFinite(given)) throw new TypeError('toTimestamp needs a valid Date or a number of ms');
  const ms = Math.floor(given); // whole milliseconds, so nanos stays below 1e9
  const seconds = Math.floor(ms / 1000);
  return { seconds: String(seconds), nanos: Math.round(ms - seconds * 1000) * 1e6 };
}

/** The Date a google.protobuf.Timestamp stands for, or null when it is unset. */
function fromTimestamp(timestamp) {
  if (!timestamp) return null;
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor((timestamp.nanos || 0) / 1e6));
}

class PosguardClient {
  /**
   * @param {string} [target] host:port of the server
   * @param {object} [options] apiKey, timeoutMs, tls, credentials, protoRoot, channelOptions
   */
  constructor(target = DEFAULT_TARGET, options = {}) {
    this.target = target;
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    this._apiKey = options.apiKey ?? null;
    this._methods = loadDefinitions(options.protoRoot ?? DEFAULT_PROTO_ROOT);
    const channelOptions = {
      'grpc.service_config': SERVICE_CONFIG,
      'grpc.enable_retries': 1,
      ...(options.tls && options.tls !== true && options.tls.serverName
        ? { 'grpc.ssl_target_name_override': options.tls.serverName }
        : {}),
      ...(options.channelOptions ?? {}),
    };
    this._client = new grpc.Client(target, channelCredentials(options), channelOptions);
  }

  /**
   * Calls any unary RPC by service and method name, e.g. call('posguard.v1.Risk', 'ReportOutcome', {...}).
   * Every call has a deadline (options.timeoutMs, else the client's) and carries the API key, if any.
   */
  call(service, method, request = {}, options = {}) {
    const methods = this._methods[service];
    const definition = methods && Object.hasOwn(methods, method) ? methods[method] : undefined;
    // Only unary RPCs: message types and streaming methods are in the same table and are refused here.
    const unary =
      definition !== undefined &&
      typeof definition.path === 'string' &&
      !definition.requestStream &&
      !definition.responseStream;
    if (!unary) return Promise.reject(new TypeError(`no unary RPC ${service}/${method}`));
    const metadata = new grpc.Metadata();
    // Health checks are public on posguard; a key goes only where it is needed.
    if (this._apiKey && options.authenticate !== false) {
      metadata.set('authorization', `Bearer ${this._apiKey}`);
    }
    const deadline = Date.now() + (options.timeoutMs ?? this.timeoutMs);
    return new Promise((resolve, reject) => {
      this._client.makeUnaryRequest(
        definition.path,
        definition.requestSerialize,
        definition.responseDeserialize,
        request,
        metadata,
        { deadline },
        (error, response) => (error ? reject(fromServiceError(error)) : resolve(response)),
      );
    });
  }

  /** Creates a customer with a new primary number. A request_id is made when none is given. */
  issueCustomerId(request = {}, options) {
    return this.call('posguard.v1.CustomerIds', 'IssueCustomerId', withRequestId(request), options);
  }

  /** Checks a number as typed; a number that fails is an answer (valid false with a reason). */
  verifyCustomerId(request, options) {
    return this.call('posguard.v1.CustomerIds', 'VerifyCustomerId', request, options);
  }

  /**
   * Scores one transaction. transaction.eventTime may be a Date. request_id is left empty unless given,
   * so the transaction id is the idempotency key and resending the same transaction is safe.
   */
  scoreTransaction(request, options) {
    const transaction = request && request.transaction;
    const prepared =
      transaction && transaction.eventTime instanceof Date
        ? { ...request, transaction: { ...transaction, eventTime: toTimestamp(transaction.eventTime) } }
        : request;
    return this.call('posguard.v1.Risk', 'ScoreTransaction', prepared, options);
  }

  /** The standard gRPC health check; resolves to the status name, e.g. 'SERVING'. */
  async checkHealth(service = '', options = {}) {
    const answer = await this.call(
      'grpc.health.v1.Health',
      'Check',
      { service },
      { ...options, authenticate: false },
    );
    return answer.status;
  }

  close() {
    this._client.close();
  }
}

function withRequestId(request) {
  return request.requestId ? request : { ...request, requestId: crypto.randomUUID() };
}

module.exports = {
  PosguardClient,
  PosguardError,
  toTimestamp,
  fromTimestamp,
  DEFAULT_TARGET,
  DEFAULT_TIMEOUT_MS,
};
