/* tracemesh C API: connect, publish, subscribe, request, close.
 *
 * Pure C, stable ABI: every function is prefixed tm_, every type tm_*. Errors
 * are negative tm_status codes; a human-readable reason for the last failure
 * on the calling thread is available from tm_last_error().
 *
 * Threading: a tm_client may be used from any thread. Handlers run on the
 * client's dispatcher thread, one at a time.
 */
#ifndef TRACEMESH_TRACEMESH_H
#define TRACEMESH_TRACEMESH_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum tm_status {
  TM_OK = 0,
  TM_ERR_INVALID_ARGUMENT = -1,
  TM_ERR_NOT_FOUND = -2,
  TM_ERR_TIMEOUT = -3,
  TM_ERR_NO_RESPONDERS = -4,
  TM_ERR_UNAUTHENTICATED = -5,
  TM_ERR_REVOKED = -6,
  TM_ERR_PERMISSION_DENIED = -7,
  TM_ERR_DISCONNECTED = -8,
  TM_ERR_OVERLOADED = -9,
  TM_ERR_PROTOCOL = -10,
  TM_ERR_STORAGE_FULL = -11,
  TM_ERR_TOO_LARGE = -12,
  TM_ERR_IO = -13,
  TM_ERR_INTERNAL = -14
} tm_status;

typedef struct tm_client tm_client; /* opaque */

typedef struct tm_connect_options {
  const char* url;             /* tcp://host:port, ipc:///path, unix:///path or native://host:port; required */
  const char* identity_path;   /* identity file (tracemesh keygen); required */
  const char* credential_path; /* credential file (tracemesh cred issue); required */
  const char* broker_key;      /* broker public key, base64url; required for tcp with CURVE */
  int curve;                   /* 1: CURVE on tcp (default when zero-initialised is 0: set it) */
  int connect_timeout_ms;      /* 0 = 5000 */
  void* reserved[4];           /* must be NULL */
} tm_connect_options;

/* A received message. All pointers are valid only during the handler call.
 * OWNERSHIP: owned by the library; copy what you keep. */
typedef struct tm_message {
  const char* topic;
  size_t topic_len;
  const void* payload;
  size_t payload_len;
  const char* producer;
  size_t producer_len;
  uint64_t sequence;
  int64_t published_at_ns;
  uint64_t id_hi, id_lo;
  void* reserved[4];
} tm_message;

typedef void (*tm_handler)(const tm_message* message, void* user_data);

/* Publish flags. */
#define TM_PUBLISH_RETAIN 1u
#define TM_PUBLISH_DURABLE 2u /* wait until the broker stored it on disk */

/* Connects and authenticates. On success *out receives a client that the
 * caller owns and must release with tm_close(). */
tm_status tm_connect(const tm_connect_options* options, tm_client** out);

tm_status tm_publish(tm_client* client, const char* topic, const void* payload, size_t len,
                     unsigned flags);

/* Subscribes with a topic filter (+ one level, # the rest). queue_group may be
 * NULL. user_data is passed to the handler; OWNERSHIP stays with the caller,
 * who must keep it valid until tm_unsubscribe() or tm_close(). */
tm_status tm_subscribe(tm_client* client, const char* filter, const char* queue_group,
                       tm_handler handler, void* user_data, uint64_t* subscription_out);
tm_status tm_unsubscribe(tm_client* client, uint64_t subscription);

/* Sends a request and waits for one reply. On success *reply_out receives a
 * buffer the caller owns and must free with tm_free(); *reply_len its size. */
tm_status tm_request(tm_client* client, const char* topic, const void* payload, size_t len,
                     int timeout_ms, void** reply_out, size_t* reply_len);

/* Replies to a request received in a handler. */
tm_status tm_reply(tm_client* client, const tm_message* request, const void* payload, size_t len);

/* Waits until everything published so far was processed by the broker. */
tm_status tm_flush(tm_client* client, int timeout_ms);

/* Sends what is queued (bounded by 5 s), disconnects and frees the client. NULL is a no-op. */
void tm_close(tm_client* client);

/* Frees memory returned by this library. NULL is a no-op. */
void tm_free(void* pointer);

/* The reason for the last failure on this thread, or "" (never NULL; owned by the library). */
const char* tm_last_error(void);

/* The library's protocol version. */
int tm_protocol_version(void);

#ifdef __cplusplus
}
#endif

#endif /* TRACEMESH_TRACEMESH_H */
