// Types of the posguard Node.js client. Field names are the .proto names in camelCase; enums are their
// value names (e.g. 'CHANNEL_POS'); int64 values arrive as decimal strings so no precision is lost.
// Answers have every field: unset scalars are their zero value and unset messages are null.

import type { ChannelCredentials, ChannelOptions, status } from '@grpc/grpc-js';

export declare const DEFAULT_TARGET: string;
export declare const DEFAULT_TIMEOUT_MS: number;

/** An int64 in an answer: a decimal string. */
export type Int64 = string;
/** An int64 in a request: a number (up to 2^53) or a decimal string. */
export type Int64Input = number | string;

export interface Timestamp {
  seconds: Int64;
  nanos: number;
}
export interface TimestampInput {
  seconds: Int64Input;
  nanos?: number;
}

export type Channel = 'CHANNEL_UNSPECIFIED' | 'CHANNEL_POS' | 'CHANNEL_ONLINE' | 'CHANNEL_MOBILE';
export type NumberStatus =
  | 'NUMBER_STATUS_UNSPECIFIED'
  | 'NUMBER_STATUS_ACTIVE'
  | 'NUMBER_STATUS_SUSPENDED'
  | 'NUMBER_STATUS_REVOKED'
  | 'NUMBER_STATUS_ROTATED';
export type NumberKind = 'NUMBER_KIND_UNSPECIFIED' | 'NUMBER_KIND_STATIC' | 'NUMBER_KIND_SUB';
export type VerificationReason =
  | 'VERIFICATION_REASON_UNSPECIFIED'
  | 'VERIFICATION_REASON_OK'
  | 'VERIFICATION_REASON_MALFORMED'
  | 'VERIFICATION_REASON_CHECK_DIGITS'
  | 'VERIFICATION_REASON_UNKNOWN_ISSUER'
  | 'VERIFICATION_REASON_NOT_FOUND'
  | 'VERIFICATION_REASON_SUSPENDED'
  | 'VERIFICATION_REASON_REVOKED'
  | 'VERIFICATION_REASON_ROTATED'
  | 'VERIFICATION_REASON_OUT_OF_SCOPE';
export type Decision = 'DECISION_UNSPECIFIED' | 'DECISION_APPROVE' | 'DECISION_REVIEW' | 'DECISION_DECLINE';
export type ModelScope =
  | 'MODEL_SCOPE_UNSPECIFIED'
  | 'MODEL_SCOPE_CUSTOMER'
  | 'MODEL_SCOPE_GLOBAL'
  | 'MODEL_SCOPE_NONE';
/** grpc.health.v1 HealthCheckResponse.ServingStatus. */
export type ServingStatus = 'UNKNOWN' | 'SERVING' | 'NOT_SERVING' | 'SERVICE_UNKNOWN';

export interface Money {
  amountMinor: Int64;
  currency: string;
}
/** Money in a request: an integer count of the currency's minor unit and an ISO 4217 code. */
export interface MoneyInput {
  amountMinor: Int64Input;
  currency: string;
}
export interface ExternalId {
  namespace: string;
  value: string;
}
export interface Location {
  latitude: number;
  longitude: number;
}
export interface Holder {
  name: string;
  phone: string;
}
export interface SubScope {
  merchantId: string;
  channel: Channel;
}

export interface CustomerNumber {
  number: string;
  display: string;
  kind: NumberKind;
  status: NumberStatus;
  issuer: string;
  keyVersion: number;
  issuedAt: Timestamp | null;
  statusChangedAt: Timestamp | null;
  statusReason: string;
  successorNumber: string;
  primaryNumber: string;
  scope: SubScope | null;
  label: string;
}

export interface Customer {
  customerId: string;
  primary: CustomerNumber | null;
  subNumbers: CustomerNumber[];
  externalIds: ExternalId[];
  holder: Holder | null;
  dynamicCodesEnrolled: boolean;
  createdAt: Timestamp | null;
  updatedAt: Timestamp | null;
}

export interface IssueCustomerIdRequest {
  /** Idempotency key; the client makes a UUID when none is given. */
  requestId?: string;
  /** Empty = the server's default issuer. */
  issuer?: string;
  merchantPart?: string;
  holder?: Partial<Holder>;
  externalIds?: ExternalId[];
}
export interface IssueCustomerIdResponse {
  customer: Customer | null;
  replayed: boolean;
}

export interface VerifyCustomerIdRequest {
  /** The number as typed: spaces and hyphens are ignored. */
  number: string;
  merchantId?: string;
  channel?: Channel;
}
export interface VerifyCustomerIdResponse {
  valid: boolean;
  reason: VerificationReason;
  status: NumberStatus;
  normalizedNumber: string;
  display: string;
  kind: NumberKind;
  customerId: string;
  issuer: string;
  successorNumber: string;
  primaryNumber: string;
}

/** A transaction to score. Exactly one of customerNumber, dynamicCode and externalId names the payer. */
export interface TransactionInput {
  transactionId: string;
  customerNumber?: string;
  dynamicCode?: string;
  externalId?: ExternalId;
  amount: MoneyInput;
  merchantId: string;
  terminalId?: string;
  mcc?: string;
  /** When the payment happened; a Date is converted for you. */
  eventTime: Date | TimestampInput;
  channel?: Channel;
  location?: Location;
}
export interface ScoreTransactionRequest {
  /** Empty = the transaction id is the idempotency key. */
  requestId?: string;
  transaction: TransactionInput;
}
export interface Reason {
  code: string;
  message: string;
  weight: number;
}
export interface ModelInfo {
  scope: ModelScope;
  version: string;
  historySize: Int64;
  coldStart: boolean;
}
export interface ScoreTransactionResponse {
  transactionId: string;
  customerId: string;
  /** In [0, 1]; higher is riskier. */
  riskScore: number;
  decision: Decision;
  reasons: Reason[];
  model: ModelInfo | null;
  replayed: boolean;
  scoredAt: Timestamp | null;
}

export interface CallOptions {
  /** Deadline of this call in milliseconds; default: the client's timeoutMs. */
  timeoutMs?: number;
}
export interface RawCallOptions extends CallOptions {
  /** Send the API key (default true). */
  authenticate?: boolean;
}

/** TLS to the server; with no caFile the system roots are trusted. certFile + keyFile give mutual TLS. */
export interface TlsOptions {
  caFile?: string;
  certFile?: string;
  keyFile?: string;
  /** Name to expect in the server's certificate, when it is not the target's host. */
  serverName?: string;
}

export interface ClientOptions {
  /** Sent as `authorization: Bearer <apiKey>` on every posguard call. */
  apiKey?: string;
  /** Default deadline of every call, in milliseconds (5000). */
  timeoutMs?: number;
  /** true = TLS with the system roots. Ignored when `credentials` is given. */
  tls?: boolean | TlsOptions;
  /** Channel credentials built by the caller, used as they are. */
  credentials?: ChannelCredentials;
  /** Folder holding posguard/v1/*.proto; default: this repository's proto/. */
  protoRoot?: string;
  /** Extra grpc-js channel options, merged over the client's. */
  channelOptions?: ChannelOptions;
}

export interface FieldViolation {
  /** Dotted path from the request root, e.g. 'transaction.amount.currency'. */
  field: string;
  description: string;
}

export interface PosguardErrorJSON {
  code: string;
  reason: string;
  message: string;
  metadata: Record<string, string>;
  fieldViolations: FieldViolation[];
}

/** A failed call: the gRPC status and the google.rpc.Status details the server sent with it. */
export declare class PosguardError extends Error {
  constructor(
    code: status,
    message: string,
    options?: {
      reason?: string;
      metadata?: Record<string, string>;
      fieldViolations?: FieldViolation[];
      cause?: unknown;
    },
  );
  /** The numeric gRPC status code (grpc.status). */
  readonly code: status;
  /** Its name, e.g. 'INVALID_ARGUMENT'. */
  readonly codeName: string;
  /** The status message for people. */
  readonly details: string;
  /** ErrorInfo.reason: stable, for programs; '' when the server sent none. */
  readonly reason: string;
  /** ErrorInfo.metadata. */
  readonly metadata: Record<string, string>;
  /** BadRequest field violations; empty unless the request was wrong. */
  readonly fieldViolations: FieldViolation[];
  toJSON(): PosguardErrorJSON;
}

export declare class PosguardClient {
  constructor(target?: string, options?: ClientOptions);
  readonly target: string;
  timeoutMs: number;
  /** Any unary RPC by full service name and method, e.g. ('posguard.v1.Risk', 'ReportOutcome'). */
  call<T = unknown>(service: string, method: string, request?: object, options?: RawCallOptions): Promise<T>;
  issueCustomerId(request?: IssueCustomerIdRequest, options?: CallOptions): Promise<IssueCustomerIdResponse>;
  verifyCustomerId(
    request: VerifyCustomerIdRequest,
    options?: CallOptions,
  ): Promise<VerifyCustomerIdResponse>;
  scoreTransaction(
    request: ScoreTransactionRequest,
    options?: CallOptions,
  ): Promise<ScoreTransactionResponse>;
  /** grpc.health.v1.Health/Check; '' asks about the server as a whole. Needs no API key. */
  checkHealth(service?: string, options?: CallOptions): Promise<ServingStatus>;
  close(): void;
}

export declare function toTimestamp(value: Date | number): Timestamp;
export declare function fromTimestamp(timestamp: TimestampInput | null | undefined): Date | null;
