// Command floor-go is the Go floor: the least ext_proc server that can route, on
// go-control-plane + grpc-go. Benchmark tooling, not product code: it only sets the
// destination header (round-robin over --endpoints) plus the envoy.lb metadata, in the
// same wiring as epp, and behaves exactly like benchmarks/baselines/floor_py.py (the body
// modes come from the first message's protocol_config; see that file's docstring).
//
//	floor-go --address 127.0.0.1:0 --endpoints 127.0.0.1:8001,127.0.0.1:8002
//
// Once listening it prints one line on stdout: {"event": "ready", "port": N}.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	modev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_proc/v3"
	extprocv3 "github.com/envoyproxy/go-control-plane/envoy/service/ext_proc/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
)

const (
	destinationHeader = "x-gateway-destination-endpoint"
	lbNamespace       = "envoy.lb"
	maxChunkBytes     = 62000 // what one streamed_response may carry back to Envoy
)

type floor struct {
	extprocv3.UnimplementedExternalProcessorServer
	endpoints []string
	next      atomic.Uint64
}

func (f *floor) pick() string {
	n := f.next.Add(1) - 1
	return f.endpoints[n%uint64(len(f.endpoints))]
}

// destination: the CommonResponse with the destination header, and the envoy.lb metadata.
func (f *floor) destination(contentLength int) (*extprocv3.CommonResponse, *structpb.Struct) {
	endpoint := f.pick()
	set := []*corev3.HeaderValueOption{header(destinationHeader, endpoint)}
	if contentLength >= 0 {
		set = append(set, header("content-length", strconv.Itoa(contentLength)))
	}
	common := &extprocv3.CommonResponse{
		HeaderMutation:  &extprocv3.HeaderMutation{SetHeaders: set},
		ClearRouteCache: true,
	}
	metadata := &structpb.Struct{Fields: map[string]*structpb.Value{
		lbNamespace: structpb.NewStructValue(&structpb.Struct{Fields: map[string]*structpb.Value{
			destinationHeader: structpb.NewStringValue(endpoint),
		}}),
	}}
	return common, metadata
}

func header(key, value string) *corev3.HeaderValueOption {
	return &corev3.HeaderValueOption{
		Header:       &corev3.HeaderValue{Key: key, RawValue: []byte(value)},
		AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD,
	}
}

func streamed(body []byte, endOfStream bool, wrap func(*extprocv3.BodyResponse) *extprocv3.ProcessingResponse) []*extprocv3.ProcessingResponse {
	var out []*extprocv3.ProcessingResponse
	for start := 0; start == 0 || start < len(body); start += maxChunkBytes {
		end := min(start+maxChunkBytes, len(body))
		mutation := &extprocv3.BodyMutation{Mutation: &extprocv3.BodyMutation_StreamedResponse{
			StreamedResponse: &extprocv3.StreamedBodyResponse{Body: body[start:end], EndOfStream: endOfStream && end == len(body)},
		}}
		out = append(out, wrap(&extprocv3.BodyResponse{Response: &extprocv3.CommonResponse{BodyMutation: mutation}}))
	}
	return out
}

func requestBody(b *extprocv3.BodyResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestBody{RequestBody: b}}
}

func responseBody(b *extprocv3.BodyResponse) *extprocv3.ProcessingResponse {
	return &extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseBody{ResponseBody: b}}
}

func (f *floor) routeHeaders(contentLength int) *extprocv3.ProcessingResponse {
	common, metadata := f.destination(contentLength)
	return &extprocv3.ProcessingResponse{
		Response:        &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{Response: common}},
		DynamicMetadata: metadata,
	}
}

func (f *floor) Process(stream extprocv3.ExternalProcessor_ProcessServer) error {
	requestMode := modev3.ProcessingMode_BUFFERED
	responseMode := modev3.ProcessingMode_BUFFERED
	first, routed := true, false
	var chunks []byte
	send := func(responses ...*extprocv3.ProcessingResponse) error {
		for _, r := range responses {
			if err := stream.Send(r); err != nil {
				return err
			}
		}
		return nil
	}
	for {
		msg, err := stream.Recv()
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
		if first {
			first = false
			if pc := msg.GetProtocolConfig(); pc != nil {
				requestMode, responseMode = pc.GetRequestBodyMode(), pc.GetResponseBodyMode()
			}
		}
		switch r := msg.Request.(type) {
		case *extprocv3.ProcessingRequest_RequestHeaders:
			switch {
			case r.RequestHeaders.GetEndOfStream() || requestMode == modev3.ProcessingMode_NONE || requestMode == modev3.ProcessingMode_STREAMED:
				routed = true
				err = send(f.routeHeaders(-1))
			case requestMode != modev3.ProcessingMode_FULL_DUPLEX_STREAMED:
				err = send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestHeaders{RequestHeaders: &extprocv3.HeadersResponse{}}})
			}
		case *extprocv3.ProcessingRequest_RequestBody:
			body := r.RequestBody
			switch {
			case requestMode == modev3.ProcessingMode_FULL_DUPLEX_STREAMED && routed:
				err = send(streamed(body.GetBody(), body.GetEndOfStream(), requestBody)...)
			case requestMode == modev3.ProcessingMode_FULL_DUPLEX_STREAMED:
				chunks = append(chunks, body.GetBody()...)
				if body.GetEndOfStream() {
					routed = true
					err = send(append([]*extprocv3.ProcessingResponse{f.routeHeaders(len(chunks))}, streamed(chunks, true, requestBody)...)...)
					chunks = nil
				}
			case routed:
				err = send(requestBody(&extprocv3.BodyResponse{}))
			default:
				routed = true
				common, metadata := f.destination(-1)
				resp := requestBody(&extprocv3.BodyResponse{Response: common})
				resp.DynamicMetadata = metadata
				err = send(resp)
			}
		case *extprocv3.ProcessingRequest_RequestTrailers:
			if requestMode == modev3.ProcessingMode_FULL_DUPLEX_STREAMED && !routed {
				routed = true
				err = send(append([]*extprocv3.ProcessingResponse{f.routeHeaders(len(chunks))}, streamed(chunks, false, requestBody)...)...)
				chunks = nil
			}
			if err == nil {
				err = send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_RequestTrailers{RequestTrailers: &extprocv3.TrailersResponse{}}})
			}
		case *extprocv3.ProcessingRequest_ResponseHeaders:
			err = send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseHeaders{ResponseHeaders: &extprocv3.HeadersResponse{}}})
		case *extprocv3.ProcessingRequest_ResponseBody:
			if responseMode == modev3.ProcessingMode_FULL_DUPLEX_STREAMED {
				err = send(streamed(r.ResponseBody.GetBody(), r.ResponseBody.GetEndOfStream(), responseBody)...)
			} else {
				err = send(responseBody(&extprocv3.BodyResponse{}))
			}
		case *extprocv3.ProcessingRequest_ResponseTrailers:
			err = send(&extprocv3.ProcessingResponse{Response: &extprocv3.ProcessingResponse_ResponseTrailers{ResponseTrailers: &extprocv3.TrailersResponse{}}})
		}
		if err != nil {
			if errors.Is(err, io.EOF) || status.Code(err) == codes.Canceled {
				return nil
			}
			return err
		}
	}
}

func main() {
	address := flag.String("address", "127.0.0.1:0", "host:port to listen on (TCP, port 0 allowed)")
	endpointList := flag.String("endpoints", "", "ip:port[,ip:port...] (round-robin)")
	flag.Parse()
	var endpoints []string
	for _, e := range strings.Split(*endpointList, ",") {
		if e = strings.TrimSpace(e); e != "" {
			if _, _, err := net.SplitHostPort(e); err != nil {
				fmt.Fprintf(os.Stderr, "floor-go: --endpoints %q: %v\n", *endpointList, err)
				os.Exit(2)
			}
			endpoints = append(endpoints, e)
		}
	}
	if len(endpoints) == 0 {
		fmt.Fprintln(os.Stderr, "floor-go: --endpoints ip:port[,ip:port...] is required")
		os.Exit(2)
	}
	listener, err := net.Listen("tcp", *address)
	if err != nil {
		fmt.Fprintf(os.Stderr, "floor-go: listen %s: %v\n", *address, err)
		os.Exit(1)
	}
	server := grpc.NewServer(grpc.MaxRecvMsgSize(64 << 20))
	extprocv3.RegisterExternalProcessorServer(server, &floor{endpoints: endpoints})
	ready, _ := json.Marshal(map[string]any{"event": "ready", "port": listener.Addr().(*net.TCPAddr).Port})
	fmt.Println(string(ready))
	os.Stdout.Sync()
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-signals; server.Stop() }()
	if err := server.Serve(listener); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		fmt.Fprintf(os.Stderr, "floor-go: %v\n", err)
		os.Exit(1)
	}
}
