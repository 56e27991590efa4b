/*
 * Probe, not part of the build: can this kernel hold bridged frames in the kernel with
 * NFQUEUE and release a prefix of them with one batch verdict? (issue 2's "in-kernel
 * hold" option). It creates a bridge-family nftables table `remus_probe` with a chain
 * on the bridge prerouting hook whose rule queues frames from IFACE to queue 7, either
 * with the native `queue` expression (nft_queue, CONFIG_NFT_QUEUE) or with xtables'
 * NFQUEUE target through nft_compat, and reports each step's answer. If a rule is
 * accepted it binds the queue (metadata only, GSO kept whole) and releases everything
 * queued after every drain of the socket (epoch 0), printing counts on SIGINT; then it
 * removes the table.
 *
 * Owns: the table `remus_probe` and queue 7 in the current network namespace.
 * Never touches: any other table, chain or queue.
 *
 * Build and run (Debian 12; the -dev packages are for this probe only):
 *   apt-get install -y libnftnl-dev libmnl-dev libnetfilter-queue-dev
 *   cc -O2 -o /tmp/nfqueue-bridge scripts/probes/nfqueue-bridge.c \
 *      -lnetfilter_queue -lnftnl -lmnl
 *   ip netns exec HOSTNS /tmp/nfqueue-bridge VIF     # VIF: a bridge port
 *
 * On Linux 6.18 here (2026-11-25): table, chain and the control rule (same match, a
 * counter instead of a queue) accepted; `queue` expression:
 * "No such file or directory" (CONFIG_NFT_QUEUE is not set); xt NFQUEUE rev 0 and 3
 * in the bridge family: "No such file or directory" (xt_NFQUEUE is not registered for
 * NFPROTO_BRIDGE). See docs/bench-net.md.
 */
#include <net/if.h> /* before the linux/ headers, which clash with it otherwise */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/netfilter.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_queue.h>
#include <linux/netfilter/xt_NFQUEUE.h>
#include <linux/netfilter_bridge.h>
#include <libmnl/libmnl.h>
#include <libnetfilter_queue/libnetfilter_queue.h>
#include <libnftnl/chain.h>
#include <libnftnl/expr.h>
#include <libnftnl/rule.h>
#include <libnftnl/table.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define QNUM 7
#define TABLE "remus_probe"

enum how { TABLE_CHAIN, RULE_CONTROL, RULE_NATIVE, RULE_XT_REV0, RULE_XT_REV3, DELETE };

/* Sends one nftables batch with one message; returns 0 or the kernel's errno. */
static int nft(enum how how, const char *ifname)
{
	char buf[MNL_SOCKET_BUFFER_SIZE];
	struct mnl_socket *nl = mnl_socket_open(NETLINK_NETFILTER);
	if (!nl || mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0)
		return errno;
	struct mnl_nlmsg_batch *b = mnl_nlmsg_batch_start(buf, sizeof buf);
	uint32_t seq = (uint32_t)time(NULL);
	nftnl_batch_begin(mnl_nlmsg_batch_current(b), seq++);
	mnl_nlmsg_batch_next(b);
	struct nlmsghdr *h;
	if (how == TABLE_CHAIN || how == DELETE) {
		struct nftnl_table *t = nftnl_table_alloc();
		nftnl_table_set_str(t, NFTNL_TABLE_NAME, TABLE);
		h = nftnl_table_nlmsg_build_hdr(mnl_nlmsg_batch_current(b),
			how == DELETE ? NFT_MSG_DELTABLE : NFT_MSG_NEWTABLE, NFPROTO_BRIDGE,
			NLM_F_CREATE | NLM_F_ACK, seq++);
		nftnl_table_nlmsg_build_payload(h, t);
		mnl_nlmsg_batch_next(b);
	}
	if (how == TABLE_CHAIN) {
		struct nftnl_chain *c = nftnl_chain_alloc();
		nftnl_chain_set_str(c, NFTNL_CHAIN_TABLE, TABLE);
		nftnl_chain_set_str(c, NFTNL_CHAIN_NAME, "pre");
		nftnl_chain_set_u32(c, NFTNL_CHAIN_HOOKNUM, NF_BR_PRE_ROUTING);
		nftnl_chain_set_s32(c, NFTNL_CHAIN_PRIO, -300);
		nftnl_chain_set_str(c, NFTNL_CHAIN_TYPE, "filter");
		h = nftnl_chain_nlmsg_build_hdr(mnl_nlmsg_batch_current(b), NFT_MSG_NEWCHAIN,
			NFPROTO_BRIDGE, NLM_F_CREATE | NLM_F_ACK, seq++);
		nftnl_chain_nlmsg_build_payload(h, c);
		mnl_nlmsg_batch_next(b);
	}
	if (how == RULE_CONTROL || how == RULE_NATIVE || how == RULE_XT_REV0 || how == RULE_XT_REV3) {
		struct nftnl_rule *r = nftnl_rule_alloc();
		nftnl_rule_set_str(r, NFTNL_RULE_TABLE, TABLE);
		nftnl_rule_set_str(r, NFTNL_RULE_CHAIN, "pre");
		nftnl_rule_set_u32(r, NFTNL_RULE_FAMILY, NFPROTO_BRIDGE);
		struct nftnl_expr *e = nftnl_expr_alloc("meta");
		nftnl_expr_set_u32(e, NFTNL_EXPR_META_KEY, NFT_META_IIFNAME);
		nftnl_expr_set_u32(e, NFTNL_EXPR_META_DREG, NFT_REG_1);
		nftnl_rule_add_expr(r, e);
		char name[IFNAMSIZ] = {0};
		strncpy(name, ifname, IFNAMSIZ - 1);
		e = nftnl_expr_alloc("cmp");
		nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_SREG, NFT_REG_1);
		nftnl_expr_set_u32(e, NFTNL_EXPR_CMP_OP, NFT_CMP_EQ);
		nftnl_expr_set(e, NFTNL_EXPR_CMP_DATA, name, IFNAMSIZ);
		nftnl_rule_add_expr(r, e);
		if (how == RULE_CONTROL) {
			e = nftnl_expr_alloc("counter");
		} else if (how == RULE_NATIVE) {
			e = nftnl_expr_alloc("queue");
			nftnl_expr_set_u16(e, NFTNL_EXPR_QUEUE_NUM, QNUM);
			nftnl_expr_set_u16(e, NFTNL_EXPR_QUEUE_TOTAL, 1);
		} else if (how == RULE_XT_REV0) {
			static struct xt_NFQ_info info = {.queuenum = QNUM};
			e = nftnl_expr_alloc("target");
			nftnl_expr_set_str(e, NFTNL_EXPR_TG_NAME, "NFQUEUE");
			nftnl_expr_set_u32(e, NFTNL_EXPR_TG_REV, 0);
			nftnl_expr_set(e, NFTNL_EXPR_TG_INFO, &info, sizeof info);
		} else {
			static struct xt_NFQ_info_v3 info = {.queuenum = QNUM, .queues_total = 1};
			e = nftnl_expr_alloc("target");
			nftnl_expr_set_str(e, NFTNL_EXPR_TG_NAME, "NFQUEUE");
			nftnl_expr_set_u32(e, NFTNL_EXPR_TG_REV, 3);
			nftnl_expr_set(e, NFTNL_EXPR_TG_INFO, &info, sizeof info);
		}
		nftnl_rule_add_expr(r, e);
		h = nftnl_rule_nlmsg_build_hdr(mnl_nlmsg_batch_current(b), NFT_MSG_NEWRULE,
			NFPROTO_BRIDGE, NLM_F_APPEND | NLM_F_CREATE | NLM_F_ACK, seq++);
		nftnl_rule_nlmsg_build_payload(h, r);
		mnl_nlmsg_batch_next(b);
	}
	nftnl_batch_end(mnl_nlmsg_batch_current(b), seq++);
	mnl_nlmsg_batch_next(b);
	int rc = 0;
	if (mnl_socket_sendto(nl, mnl_nlmsg_batch_head(b), mnl_nlmsg_batch_size(b)) < 0)
		rc = errno;
	struct timeval tv = {0, 300000};
	setsockopt(mnl_socket_get_fd(nl), SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
	while (!rc) {
		int n = mnl_socket_recvfrom(nl, buf, sizeof buf);
		if (n <= 0)
			break;
		if (mnl_cb_run(buf, n, 0, mnl_socket_get_portid(nl), NULL, NULL) < 0)
			rc = errno;
	}
	mnl_socket_close(nl);
	return rc;
}

static volatile sig_atomic_t stop;
static uint32_t last_id;
static uint64_t frames, bytes;

static void on_signal(int s) { (void)s; stop = 1; }

static int on_packet(const struct nlmsghdr *nlh, void *data)
{
	(void)data;
	struct nlattr *attr[NFQA_MAX + 1] = {0};
	if (nfq_nlmsg_parse(nlh, attr) < 0 || !attr[NFQA_PACKET_HDR])
		return MNL_CB_OK;
	struct nfqnl_msg_packet_hdr *ph = mnl_attr_get_payload(attr[NFQA_PACKET_HDR]);
	last_id = ntohl(ph->packet_id);
	frames++;
	if (attr[NFQA_CAP_LEN])
		bytes += ntohl(mnl_attr_get_u32(attr[NFQA_CAP_LEN]));
	return MNL_CB_OK;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s IFACE (a bridge port, in its namespace)\n", argv[0]);
		return 2;
	}
	setvbuf(stdout, NULL, _IONBF, 0);
	nft(DELETE, argv[1]);
	int rc = nft(TABLE_CHAIN, argv[1]);
	printf("bridge table + prerouting chain: %s\n", rc ? strerror(rc) : "accepted");
	if (rc)
		return 1;
	rc = nft(RULE_CONTROL, argv[1]);
	printf("control rule (same match, a counter instead of a queue): %s\n",
	       rc ? strerror(rc) : "accepted");
	const char *names[] = {"native queue expression", "xt NFQUEUE rev 0 (nft_compat)",
			       "xt NFQUEUE rev 3 (nft_compat)"};
	enum how rules[] = {RULE_NATIVE, RULE_XT_REV0, RULE_XT_REV3};
	int ok = -1;
	for (int i = 0; i < 3 && ok < 0; i++) {
		rc = nft(rules[i], argv[1]);
		printf("rule with %s: %s\n", names[i], rc ? strerror(rc) : "accepted");
		if (!rc)
			ok = i;
	}
	if (ok < 0) {
		nft(DELETE, argv[1]);
		printf("no way to queue bridged frames on this kernel\n");
		return 1;
	}
	/* No SA_RESTART: the signal must end the blocking recv(). */
	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);
	struct mnl_socket *nl = mnl_socket_open(NETLINK_NETFILTER);
	mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID);
	int one = 1, big = 64 << 20, fd = mnl_socket_get_fd(nl);
	setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
	setsockopt(fd, SOL_NETLINK, NETLINK_NO_ENOBUFS, &one, sizeof one);
	static char buf[0x10000];
	struct nlmsghdr *h = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, QNUM);
	nfq_nlmsg_cfg_put_cmd(h, AF_UNSPEC, NFQNL_CFG_CMD_BIND);
	mnl_socket_sendto(nl, h, h->nlmsg_len);
	h = nfq_nlmsg_put(buf, NFQNL_MSG_CONFIG, QNUM);
	nfq_nlmsg_cfg_put_params(h, NFQNL_COPY_META, 0);
	mnl_attr_put_u32(h, NFQA_CFG_FLAGS, htonl(NFQA_CFG_F_GSO));
	mnl_attr_put_u32(h, NFQA_CFG_MASK, htonl(NFQA_CFG_F_GSO));
	mnl_attr_put_u32(h, NFQA_CFG_QUEUE_MAXLEN, htonl(1 << 20));
	mnl_socket_sendto(nl, h, h->nlmsg_len);
	printf("queue %d bound; releasing after every drain until SIGINT\n", QNUM);
	fflush(stdout);
	uint32_t released = 0;
	while (!stop) {
		int n = recv(fd, buf, sizeof buf, 0);
		while (n > 0) {
			mnl_cb_run(buf, n, 0, 0, on_packet, NULL);
			n = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
		}
		if (last_id != released) {
			char vbuf[256];
			struct nlmsghdr *v = nfq_nlmsg_put(vbuf, NFQNL_MSG_VERDICT_BATCH, QNUM);
			nfq_nlmsg_verdict_put(v, last_id, NF_ACCEPT);
			mnl_socket_sendto(nl, v, v->nlmsg_len);
			released = last_id;
		}
	}
	printf("released %llu frames, %llu bytes\n", (unsigned long long)frames,
	       (unsigned long long)bytes);
	nft(DELETE, argv[1]);
	return 0;
}
