/*
 * Fuzz target: the control socket's request handling (vmm/control.c: JSON
 * parsing, the QMP session, argument checks, the command table, replies)
 * against a fake VM. The input is split into lines as the socket would be.
 */
#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <json-c/json.h>

#include "migration/channel.h"
#include "vfiomig/common.h"
#include "vmm/control.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * The fake VM: enough state that commands succeed and fail the way the real
 * ones do (vmm/vm_cmd.c), so every reply path runs. Its own file-scope
 * definition: control.c only ever holds the pointer.
 */
struct vm {
	bool migrating, stopped;
	uint64_t downtime_limit, max_bandwidth;
};

int vm_migrate(struct vm *vm, const char *uri, bool postcopy, struct vfm_error *err)
{
	struct vfm_uri u;
	int r;

	if (vm->migrating)
		return vfm_error_set(err, -EBUSY, "a migration is already in progress");
	if (postcopy)
		return vfm_error_set(err, -ENOTSUP, "postcopy is not supported");
	/* The real parser: a migrate URI comes straight off the socket. */
	if ((r = vfm_uri_parse(uri, &u, err)))
		return r;
	vm->migrating = true;
	return 0;
}

void vm_migrate_cancel(struct vm *vm)
{
	vm->migrating = false;
}

int vm_stop(struct vm *vm, struct vfm_error *err)
{
	vm->stopped = true;
	return 0;
}

int vm_cont(struct vm *vm, struct vfm_error *err)
{
	if (vm->migrating)
		return vfm_error_set(err, -EBUSY, "a migration is running");
	vm->stopped = false;
	return 0;
}

int vm_set_params(struct vm *vm, json_object *args, struct vfm_error *err)
{
	uint64_t dl = vm->downtime_limit, bw = vm->max_bandwidth;

	json_object_object_foreach(args, key, val) {
		int64_t v = json_object_get_int64(val);

		if (!strcmp(key, "downtime-limit") && json_object_is_type(val, json_type_int) &&
		    v >= 0 && v <= 2000000)
			dl = (uint64_t)v;
		else if (!strcmp(key, "max-bandwidth") && json_object_is_type(val, json_type_int) &&
			 v >= 0)
			bw = (uint64_t)v;
		else
			return vfm_error_set(err, -EINVAL, "Parameter '%s' is invalid", key);
	}
	vm->downtime_limit = dl;
	vm->max_bandwidth = bw;
	return 0;
}

json_object *vm_query_params(struct vm *vm)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "downtime-limit", json_object_new_int64((int64_t)vm->downtime_limit));
	json_object_object_add(o, "max-bandwidth", json_object_new_int64((int64_t)vm->max_bandwidth));
	return o;
}

json_object *vm_query_migrate(struct vm *vm)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "status", json_object_new_string(vm->migrating ? "active" : "none"));
	json_object_object_add(o, "error", json_object_new_string(""));
	return o;
}

json_object *vm_query_status(struct vm *vm)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "status", json_object_new_string(vm->stopped ? "paused" : "running"));
	json_object_object_add(o, "running", json_object_new_boolean(!vm->stopped));
	return o;
}

json_object *vm_query_vfiomig(struct vm *vm)
{
	json_object *o = json_object_new_object();

	json_object_object_add(o, "vm", vm_query_status(vm));
	json_object_object_add(o, "migration", vm_query_migrate(vm));
	json_object_object_add(o, "devices", json_object_new_array());
	return o;
}

int vm_guest_verify(struct vm *vm, json_object **out, struct vfm_error *err)
{
	*out = json_object_new_object();
	json_object_object_add(*out, "verified", json_object_new_boolean(1));
	return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	struct vm vm = { .downtime_limit = 300 };
	struct control *c;
	char *buf, *line, *nl, *reply;

	if (size > (256u << 10) || control_open_detached(&vm, &c))
		return 0;
	buf = malloc(size + 1);
	if (!buf) {
		control_close(c);
		return 0;
	}
	memcpy(buf, data, size);
	buf[size] = '\0';
	/* Lines as the socket frames them; a NUL ends what the parser sees. */
	for (line = buf; line < buf + size; line = nl + 1) {
		nl = memchr(line, '\n', (size_t)(buf + size - line));
		if (!nl)
			nl = buf + size;
		*nl = '\0';
		reply = control_handle_line(c, line);
		/* Every request but a blank line gets exactly one reply line. */
		if (reply && line[strspn(line, " \t\r")] &&
		    (!*reply || strchr(reply, '\n') != reply + strlen(reply) - 1))
			abort();
		if (reply && *reply) {
			json_object *o = json_tokener_parse(reply);

			if (!o)
				abort();   /* a reply that is not JSON */
			json_object_put(o);
		}
		free(reply);
		if (control_quit_requested(c))
			break;
	}
	free(buf);
	control_close(c);
	return 0;
}
